"""Every command in a `bash` block of README.md and docs/*.md stays true, cheaply (`make test`):

- single runs compose and pass the config check in-process; the README's train for real through the CLI
  (small data, one epoch, a tmp dir), started together in the background as the module begins;
- sweeps: every value of every swept key composes (Hydra's compose API); the README's small grid runs;
- commands the docs call refused: Hydra refuses them while composing, or `linreg.config.check` does;
- `linreg.evaluate` checks its inputs on a real checkpoint, `linreg.results` rebuilds a real sweep dir,
  `--help` and `--cfg` print in-process, the Python block runs;
- make targets exist (`make -n`), pip commands name what pyproject.toml declares, slurm-local.sh has each
  subcommand. In `make test-all` (`system`) every other command runs for real, small.
A command of a kind this file does not know fails `test_every_command_is_of_a_known_kind`.
"""

import math
import os
import re
import shlex
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest
from omegaconf import DictConfig

from tests.conftest import REPO, SMALL, run_cli

DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
PYTHON = ".venv/bin/python"
ENTRIES = {  # how a doc spells an entry point -> (kind, the module run with `python -m`)
    f"{PYTHON} -m linreg.train": ("train", "linreg.train"),
    ".venv/bin/linreg-train": ("train", "linreg.train"),
    f"{PYTHON} -m linreg.evaluate": ("evaluate", "linreg.evaluate"),
    ".venv/bin/linreg-evaluate": ("evaluate", "linreg.evaluate"),
    f"{PYTHON} -m linreg.results": ("results", "linreg.results"),
}
SLURM_LOCAL = "scripts/slurm-local.sh"


def no_spaced_placeholders(text: str) -> str:
    """`<run dir>` as `<run_dir>`: one word."""
    return re.sub(r"<[^<>]*>", lambda m: m[0].replace(" ", "_"), text)


@dataclass(frozen=True)
class Command:
    """One command of a doc's bash block: continuation lines joined, its comment apart."""

    doc: str
    lineno: int
    text: str
    note: str

    @property
    def env(self) -> dict[str, str]:
        """Leading `NAME=value` assignments."""
        return dict(w.split("=", 1) for w in self.words() if re.fullmatch(r"[A-Z_][A-Z0-9_]*=\S*", w))

    def words(self) -> list[str]:
        """The shell's words, a placeholder (`<run dir>`) kept as one."""
        return shlex.split(no_spaced_placeholders(self.text))

    @property
    def program(self) -> str:
        """The command without its leading environment assignments."""
        return re.sub(r"^(?:[A-Z_][A-Z0-9_]*=\S*\s+)*", "", self.text)

    @property
    def entry(self) -> tuple[str, str, list[str]] | None:
        """(kind, module, arguments) for a linreg entry point."""
        for spelling, (kind, module) in ENTRIES.items():
            if self.program == spelling or self.program.startswith(spelling + " "):
                return kind, module, shlex.split(no_spaced_placeholders(self.program[len(spelling) :]))
        return None

    @property
    def kind(self) -> str:
        """train-single, train-sweep, train-info, refused, evaluate, results, make, pip, slurm-local, or unknown."""
        if self.entry is not None:
            kind, _, args = self.entry
            if kind != "train":
                return kind
            if self.note.startswith("refused"):
                return "refused"
            if "-m" in args or "--multirun" in args:
                return "train-sweep"
            return "train-info" if any(a.startswith("--") for a in args) else "train-single"
        first = self.program.split()[0] if self.program.split() else ""
        if first == "make":
            return "make"
        if self.program.startswith("pip install "):
            return "pip"
        if SLURM_LOCAL in self.program:
            return "slurm-local"
        return "unknown"

    def __str__(self) -> str:
        return f"{self.doc}:{self.lineno}"


def bash_commands(path: Path) -> list[Command]:
    """The commands of every ```bash block in a Markdown file (indented blocks in lists too)."""
    text = path.read_text()
    found = []
    for block in re.finditer(r"^([ \t]*)```bash\n(.*?)^\1```", text, flags=re.S | re.M):
        first_line = text.count("\n", 0, block.start(2)) + 1
        lines = textwrap.dedent(block.group(2)).splitlines()
        i = 0
        while i < len(lines):
            start, line = i, lines[i]
            while line.rstrip().endswith("\\") and i + 1 < len(lines):
                i += 1
                line = line.rstrip()[:-1] + " " + lines[i].strip()
            i += 1
            command, note = line.strip(), ""
            if commented := re.match(r"(.*?)\s+#\s?(.*)$", command):
                command, note = commented[1].strip(), commented[2].strip()
            if command and not command.startswith("#"):
                found.append(Command(path.relative_to(REPO).as_posix(), first_line + start, command, note))
    return found


COMMANDS = [c for doc in DOCS for c in bash_commands(doc)]


def of_kind(*kinds: str, doc: str | None = None) -> list[Command]:
    return [c for c in COMMANDS if c.kind in kinds and (doc is None or c.doc == doc)]


def once(commands: list[Command]) -> list[Command]:
    """The first of each command the docs repeat (the README's sweeps are in docs/sweeps.md too)."""
    first: dict[str, Command] = {}
    for c in commands:
        first.setdefault(c.text, c)
    return list(first.values())


def filled(args: list[str], run_dir: Path, sweep_dir: Path) -> list[str]:
    """A doc's placeholders (`<run dir>`, `<time>`, `<your partition>`) made real; `-m` as Hydra's `--multirun`."""
    out = []
    for arg in args:
        key, eq, value = arg.partition("=")
        if eq and "<" in value:
            value = {
                "hydra.run.dir": str(run_dir),
                "hydra.sweep.dir": str(sweep_dir),
                "ckpt_path": str(run_dir / "checkpoints" / "last.ckpt"),
            }.get(key, re.sub(r"<[^>]*>", "x", value))
        elif "<" in arg:
            arg = re.sub(r"<[^>]*>", "x", arg)
        out.append(f"{key}{eq}{value}" if eq else ("--multirun" if arg == "-m" else arg))
    return out


# ---------------------------------------------------------------- what the docs are


def test_the_docs_show_what_a_newcomer_needs():
    readme = (REPO / "README.md").read_text()
    assert len(readme.splitlines()) <= 210, "the README is a newcomer's guide: reference goes to docs/"
    texts = [c.text for c in of_kind("make", doc="README.md")]
    assert "make run" in texts and "make test" in texts
    assert len(of_kind("train-single", doc="README.md")) >= 3 and of_kind("train-sweep", doc="README.md")
    assert any("download.pytorch.org/whl/cpu" in c.text for c in of_kind("pip", doc="README.md"))
    for name in ("tensorGenReg", "linreg", "squared_loss", "sgd", "ManualRegression", "LinearRegression"):
        assert f"`{name}" in readme or f".{name}`" in readme, name
    assert "RegressionDataModule" in readme


def test_every_doc_is_linked_and_every_link_resolves():
    readme = (REPO / "README.md").read_text()
    for doc in DOCS[1:]:
        assert f"(docs/{doc.name})" in readme, f"README.md does not link {doc.name}"
    for doc in DOCS:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", doc.read_text()):
            if not re.match(r"[a-z]+://", target):
                assert (doc.parent / target).exists(), f"{doc.name}: broken link {target}"
    pictures = "".join(d.read_text() for d in DOCS)
    assert "tensorboard.png" in pictures and "sweep-mse.png" in pictures


def test_every_command_is_of_a_known_kind():
    unknown = [f"{c}: {c.text}" for c in COMMANDS if c.kind == "unknown"]
    assert not unknown, "teach tests/test_docs.py to check these (or write them as prose): " + "; ".join(unknown)


# ---------------------------------------------------------------- in-process: composing, checking


COMPOSED: dict[tuple[str, ...], DictConfig] = {}  # one compose per distinct job of all the docs' commands


@pytest.fixture
def compose_train():
    """Compose `train.yaml` with a doc's arguments, as the CLI would (hydra config included)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from linreg.train import CONFIG_DIR

    def composed(overrides: list[str]) -> DictConfig:
        key = tuple(sorted(overrides))  # keys are unique in a doc's command, so their order does not matter
        if key not in COMPOSED:
            COMPOSED[key] = compose("train", overrides=list(overrides), return_hydra_config=True)
        return COMPOSED[key]

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        yield composed
    GlobalHydra.instance().clear()


@pytest.mark.parametrize("command", of_kind("train-single"), ids=str)
def test_every_single_run_composes_and_passes_the_checks(compose_train, tmp_path, command):
    from linreg.config import check

    _, _, args = command.entry
    cfg = compose_train([*filled(args, tmp_path / "run", tmp_path / "sweep"), *SMALL])
    check(cfg)


@pytest.mark.parametrize("command", of_kind("train-sweep"), ids=str)
def test_every_sweep_composes_for_each_value(compose_train, tmp_path, command):
    from hydra.core.override_parser.overrides_parser import OverridesParser

    _, _, args = command.entry
    args = [a for a in filled(args, tmp_path / "run", tmp_path / "sweep") if a != "--multirun"]
    choices = []
    for o in OverridesParser.create().parse_overrides(args):
        values = list(o.sweep_string_iterator())[:3] if o.is_sweep_override() else [o.get_value_element_as_str()]
        choices.append((o.input_line.split("=", 1)[0], values))
    for i, (key, values) in enumerate(choices):  # each value, the other keys at their first value
        for value in values:
            compose_train([*(f"{k}={v[0]}" for k, v in choices[:i] + choices[i + 1 :]), f"{key}={value}"])


@pytest.mark.parametrize("command", of_kind("refused"), ids=str)
def test_what_the_docs_call_refused_is_refused(compose_train, tmp_path, command):
    from linreg.config import ConfigError, check

    _, _, args = command.entry
    overrides = [*filled(args, tmp_path / "run", tmp_path / "sweep"), *SMALL]
    if command.note.startswith("refused by Hydra"):
        with pytest.raises(Exception, match=r"\S"):
            compose_train(overrides)
    else:
        with pytest.raises(ConfigError):
            check(compose_train(overrides))


@pytest.mark.parametrize("command", of_kind("train-info"), ids=str)
def test_help_and_cfg_print_without_running(monkeypatch, capsys, tmp_path, command):
    from hydra.core.global_hydra import GlobalHydra

    import linreg.train

    _, _, args = command.entry
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["linreg.train", *filled(args, tmp_path / "run", tmp_path / "sweep")])
    GlobalHydra.instance().clear()
    try:
        linreg.train.main()
    except SystemExit as end:  # --help ends with exit 0
        assert end.code in (0, None)
    finally:
        GlobalHydra.instance().clear()
    shown = capsys.readouterr().out
    if "--help" in args:
        assert all(w in shown for w in ("model: linear, manual", "model.lr", "data.batch_size", "sweep:")), shown
    else:
        assert "model:" in shown and "_target_:" in shown, shown
    assert not (tmp_path / "outputs").exists()


def test_the_python_block_runs(monkeypatch, tmp_path):
    """docs/configuration.md's `run` from Python, as written (it uses 100 samples and one epoch)."""
    blocks = re.findall(r"```python\n(.*?)```", (REPO / "docs" / "configuration.md").read_text(), flags=re.S)
    assert len(blocks) == 1 and "data.num_examples=100" in blocks[0]
    monkeypatch.chdir(tmp_path)
    exec(compile(blocks[0], "docs/configuration.md", "exec"), {})
    assert (tmp_path / "outputs" / "from-python" / "metrics.json").is_file()


# ---------------------------------------------------------------- static: make, pip, scripts


@pytest.mark.parametrize("command", of_kind("make"), ids=str)
def test_every_make_target_exists(command):
    args = filled(command.words()[1:], Path("x"), Path("x"))
    proc = subprocess.run(["make", "-n", *args], cwd=REPO, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("command", of_kind("pip"), ids=str)
def test_every_pip_command_names_what_pyproject_declares(command):
    """The install itself is tests/test_install.py's (a wheel, `system`); here: the names and the CPU index."""
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    declared = {re.split(r"[<>=!~\[ ;]", d, maxsplit=1)[0] for d in project["dependencies"]}
    words = command.words()[2:]
    if "--index-url" in words:
        url = words[words.index("--index-url") + 1]
        assert url.startswith("https://download.pytorch.org/whl/") and url.endswith("/cpu"), url
        words = words[: words.index("--index-url")] + words[words.index("--index-url") + 2 :]
    for word in words:
        path, _, extras = word.partition("[")
        if path == ".":
            extras = set(extras.rstrip("]").split(",")) - {""}
            assert extras <= set(project["optional-dependencies"]), extras
        else:
            assert word in declared, f"{word} is not a dependency of linreg"


@pytest.mark.parametrize("command", of_kind("slurm-local"), ids=str)
def test_every_slurm_local_subcommand_exists(command):
    script = REPO / SLURM_LOCAL
    assert os.access(script, os.X_OK)
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0
    sub = re.search(re.escape(SLURM_LOCAL) + r"\s+(\w+)", command.text)[1]
    assert re.search(rf"^\s*{sub}\)", script.read_text(), flags=re.M), f"{SLURM_LOCAL} has no `{sub}`"


# ---------------------------------------------------------------- through the CLI: the README's runs


def cli(command: Command, args: list[str], cwd: Path) -> subprocess.Popen:
    """Start a doc's command as a user would (the console scripts of this venv), with its environment."""
    _, module, _ = command.entry
    script = Path(sys.executable).parent / command.program.split()[0].rsplit("/", 1)[-1]
    head = [str(script)] if command.program.startswith(".venv/bin/linreg-") else [sys.executable, "-m", module]
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONWARNINGS", "HYDRA_FULL_ERROR")} | command.env
    return subprocess.Popen([*head, *args], cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def jobs(command: Command) -> int:
    """How many jobs a sweep command's own comma lists make (a preset's not counted)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides([a for a in command.entry[2] if a not in ("-m", "--multirun")])
    return math.prod(len(list(o.sweep_string_iterator())) for o in parsed if o.is_sweep_override())


DEFAULT_RUN = f"{PYTHON} -m linreg.train"  # conftest's `single_run` is this one
# Through the CLI in `make test`: the README's default run (conftest's `single_run`), its runs through another entry
# point (the console script) and its small sweeps. Every other command is checked in-process here (a choice of model
# or preset is config: composing checks it; tests/test_train.py trains each) and runs for real in `make test-all`.
CLI_SINGLE = [c for c in of_kind("train-single", doc="README.md") if not c.text.startswith(DEFAULT_RUN)]
CLI_SWEEPS = [c for c in of_kind("train-sweep", doc="README.md") if "sweep=" not in c.text and jobs(c) <= 8]


@dataclass
class Started:
    """A command started in the background: where it writes, and the process."""

    out: Path
    proc: subprocess.Popen

    def result(self) -> tuple[str, str, int]:
        stdout, stderr = self.proc.communicate(timeout=300)
        return stdout, stderr, self.proc.returncode


@pytest.fixture(scope="module", autouse=True)
def started(request, tmp_path_factory):
    """The module's CLI commands, started together as it begins: they train while the in-process checks run."""
    root = tmp_path_factory.mktemp("docs_cli")
    runs: dict[Command, Started] = {}
    selected = {getattr(item, "originalname", "") for item in request.session.items}
    users = {
        "test_the_readmes_single_runs_train",
        "test_the_readmes_sweep_ends_with_its_table",
        "test_results_rebuilds_a_sweep_dir",
    }
    for i, command in enumerate(CLI_SINGLE + CLI_SWEEPS if selected & users else []):
        out = root / f"out{i}"
        where = f"hydra.sweep.dir={out}" if command in CLI_SWEEPS else f"hydra.run.dir={out}"
        runs[command] = Started(out, cli(command, [*filled(command.entry[2], out, out), *SMALL, where], root))
    yield runs
    for run in runs.values():
        if run.proc.poll() is None:
            run.proc.kill()
        run.proc.communicate()


@pytest.mark.parametrize(
    "command", [c for c in of_kind("train-single") if c.text == DEFAULT_RUN][:1] + CLI_SINGLE, ids=str
)
def test_the_readmes_single_runs_train(started, single_run, command):
    if command.text == DEFAULT_RUN:
        out, (stdout, stderr, rc) = single_run.dir, (single_run.proc.stdout, "", single_run.proc.returncode)
    else:
        out, (stdout, stderr, rc) = started[command].out, started[command].result()
    assert rc == 0, stderr[-2000:]
    assert "status=ok" in stdout and (out / "metrics.json").is_file()
    assert str(out) in stdout  # the run dir, printed for evaluate


@pytest.mark.parametrize("command", CLI_SWEEPS, ids=str)
def test_the_readmes_sweep_ends_with_its_table(started, command):
    stdout, stderr, rc = started[command].result()
    assert rc == 0, stderr[-2000:]
    rows = (started[command].out / "results.csv").read_text().splitlines()
    assert len(rows) == 1 + jobs(command)


@pytest.mark.parametrize("command", of_kind("evaluate"), ids=str)
def test_every_evaluate_passes_its_checks_on_a_real_checkpoint(single_run, command):
    """In-process: evaluate's config composed and its inputs checked (the checkpoint read, the held-out set)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from linreg.evaluate import check_inputs
    from linreg.train import CONFIG_DIR

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("evaluate", overrides=filled(command.entry[2], single_run.dir, single_run.dir))
    GlobalHydra.instance().clear()
    inputs = check_inputs(cfg)
    assert inputs.ckpt == (single_run.dir / "checkpoints" / "last.ckpt").resolve()


@pytest.mark.parametrize("command", of_kind("results"), ids=str)
def test_results_rebuilds_a_sweep_dir(started, command):
    """In-process, on the README's sweep once it has ended."""
    from linreg.results import main

    assert CLI_SWEEPS and len(command.entry[2]) == 1  # the sweep dir
    sweep = started[CLI_SWEEPS[0]]
    assert sweep.result()[2] == 0
    (sweep.out / "results.csv").unlink()
    assert main([str(sweep.out)]) == 0
    assert (sweep.out / "results.csv").is_file() and (sweep.out / "results.md").is_file()


# ---------------------------------------------------------------- make test-all: every other command for real


@pytest.mark.system
@pytest.mark.parametrize("command", of_kind("evaluate"), ids=str)
def test_every_evaluate_runs(single_run, tmp_path, command):
    stdout, stderr = (proc := cli(command, filled(command.entry[2], single_run.dir, tmp_path), tmp_path)).communicate()
    assert proc.returncode == 0 and "heldout_mse=" in stdout, stderr[-2000:]
    assert len(list(tmp_path.glob("outputs/eval/*/eval.json"))) == 1


@pytest.mark.system
@pytest.mark.parametrize(
    "command",
    once([c for c in of_kind("train-single", "refused") if c not in CLI_SINGLE and c.text != DEFAULT_RUN]),
    ids=str,
)
def test_every_other_single_run_runs(single_run, tmp_path, command):
    given_dir = "hydra.run.dir=<" in command.text  # a run to continue: the shared one (resume returns it as it is)
    run_dir = single_run.dir if given_dir else tmp_path / "run"
    args = [*filled(command.entry[2], run_dir, tmp_path / "sweep"), *SMALL]
    args += [] if given_dir else [f"hydra.run.dir={run_dir}"]
    stdout, stderr = (proc := cli(command, args, tmp_path)).communicate(timeout=300)
    if command.kind == "refused":
        assert proc.returncode == (1 if command.note.startswith("refused by Hydra") else 2), stderr
        assert "Traceback" not in stderr and not run_dir.exists()
    else:
        assert proc.returncode == 0 and "status=ok" in stdout, stderr[-2000:]


@pytest.mark.system
@pytest.mark.parametrize(
    "command", once([c for c in of_kind("train-sweep") if c.text not in {s.text for s in CLI_SWEEPS}]), ids=str
)
def test_every_other_sweep_runs_small(tmp_path, command):
    """Each sweep at 100 samples and 1 epoch, Hydra's `range` cut to 4 values, Optuna to 4 trials."""
    import torch

    if re.search(r"hydra/launcher=(vectorized_)?slurm", command.text):
        pytest.skip("tests/test_slurm.py runs sweeps on a SLURM cluster")
    args = filled(command.entry[2], tmp_path / "run", tmp_path / "sweep")
    args = [
        re.sub(r"range\((\d+),(\d+)\)", lambda m: f"range({m[1]},{min(int(m[2]), int(m[1]) + 4)})", a) for a in args
    ]
    if "trainer.accelerator=cpu,gpu" in args and not torch.cuda.is_available():
        pytest.skip("a CPU-against-GPU sweep needs a GPU")
    if not any(a.startswith("hydra.sweep.dir=") for a in args):
        args.append(f"hydra.sweep.dir={tmp_path / 'sweep'}")
    fewer = ["hydra.sweeper.n_trials=4"] if "optuna" in command.text else []
    proc = run_cli(*args, *SMALL, *fewer, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (tmp_path / "sweep" / "results.csv").is_file()
