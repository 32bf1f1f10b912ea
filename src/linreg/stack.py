"""The training stack (Lightning and this package's modules on it): imported once per process, then frozen."""

import functools
import gc


# Its own module, not train.py: run as `python -m linreg.train`, train.py is __main__, and joblib and
# submitit pickle __main__'s functions by value with a fresh copy of its globals for every job. A function
# of an importable module is pickled by name, so this cache holds for the worker process's life.
@functools.cache
def import_training_stack() -> None:
    """Import Lightning and this package's modules on it once per process; then freeze what the imports made."""
    # The imports make ~0.5M long-lived objects. With the GC on, the full collections during the imports walk
    # them again and again (~1.4 s here), and after them every full collection would (~3.5 s of a 48-job
    # sweep). Frozen objects are never collected, so the freeze comes before any job's objects exist (a
    # frozen Trainer/DataModule cycle would keep its data for the process's life).
    enabled = gc.isenabled()
    gc.disable()
    try:
        import lightning  # noqa: F401
        from lightning.pytorch.loggers import TensorBoardLogger  # noqa: F401

        import linreg.dashboard  # noqa: F401
        import linreg.data  # noqa: F401
        import linreg.models  # noqa: F401
    finally:
        gc.freeze()
        if enabled:
            gc.enable()
