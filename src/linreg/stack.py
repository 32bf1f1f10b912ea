"""The training stack (Lightning and this package's modules on it), imported in one call."""


def import_training_stack() -> None:
    """Import Lightning and this package's modules on it (plain imports: Python caches them per process)."""
    import lightning  # noqa: F401
    from lightning.pytorch.loggers import TensorBoardLogger  # noqa: F401

    import linreg.dashboard  # noqa: F401
    import linreg.data  # noqa: F401
    import linreg.models  # noqa: F401
