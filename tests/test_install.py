"""`pip install .` as a user would: a wheel that carries its configs and declares what it imports."""

import ast
import importlib.metadata
import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.system


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The project's wheel, built from the checkout without network (setuptools is in the venv)."""
    out = tmp_path_factory.mktemp("wheel")
    cmd = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(out), str(REPO)]
    subprocess.run(cmd, check=True, capture_output=True, timeout=300)
    return next(out.glob("linreg-*.whl"))


@pytest.fixture(scope="module")
def installed(wheel, tmp_path_factory) -> Path:
    """The wheel installed into a folder of its own (dependencies come from the venv)."""
    target = tmp_path_factory.mktemp("site")
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), str(wheel)]
    subprocess.run(cmd, check=True, capture_output=True, timeout=300)
    return target


def test_the_wheel_carries_the_configs_and_the_plugins(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    shipped = {n.removeprefix("linreg/conf/") for n in names if n.startswith("linreg/conf/")}
    in_checkout = {str(p.relative_to(REPO / "conf")) for p in (REPO / "conf").rglob("*.yaml")}
    assert shipped == in_checkout
    assert "hydra_plugins/linreg_sweeper/grid_sweeper.py" in names


@pytest.mark.parametrize("how", ["module", "script"])
def test_the_installed_package_trains_from_any_directory(installed, tmp_path, how):
    env = {**os.environ, "PYTHONPATH": str(installed)}
    args = ["data.num_examples=100", "trainer.max_epochs=1", f"hydra.run.dir={tmp_path / 'run'}"]
    script = [installed / "bin" / "linreg-train"]
    cmd = [*(script if how == "script" else [sys.executable, "-m", "linreg.train"]), *args]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "manual: status=ok" in proc.stdout and (tmp_path / "run" / "metrics.json").exists()
    where = [sys.executable, "-c", "import linreg; print(linreg.__file__)"]
    found = subprocess.run(where, cwd=tmp_path, env=env, capture_output=True, text=True, check=True).stdout
    assert Path(found.strip()).is_relative_to(installed)  # not the checkout's editable install


def imported_modules(root: Path) -> set[str]:
    """Top-level names of every module the package's source imports."""
    names = set()
    for path in root.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names.add(node.module.split(".")[0])
    return names


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def test_every_third_party_import_is_an_install_requirement(wheel):
    metadata = zipfile.ZipFile(wheel).read(next(n for n in zipfile.ZipFile(wheel).namelist() if n.endswith("METADATA")))
    required = {
        normalize(re.split(r"[ ;<>=!~\[]", line.split(":", 1)[1].strip())[0])
        for line in metadata.decode().splitlines()
        if line.startswith("Requires-Dist:") and "extra ==" not in line
    }
    providers = importlib.metadata.packages_distributions()
    third_party = imported_modules(REPO / "src") - set(sys.stdlib_module_names) - {"linreg", "hydra_plugins"}
    # Launchers and sweepers are optional plugins (the `sweep` extra): imported only when configured.
    optional = {"optuna", "sqlalchemy", "submitit", "hydra_plugins"}
    missing = {
        m: providers.get(m)
        for m in third_party - optional
        if not {normalize(d) for d in providers.get(m, [m])} & required
    }
    assert not missing, f"imported but not required: {missing}"
