"""reproduce.py: `make run` (the tutorial's four experiments in one table) as a user runs it, and its refusals."""

import pytest

from linreg.reproduce import main
from tests.conftest import run_cli


def test_make_run_reproduces_the_tutorial_in_one_table(tmp_path):
    proc = run_cli("-m", "linreg.reproduce", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = {line.split()[0]: line.split() for line in proc.stdout.splitlines()[2:6]}
    assert list(rows) == ["tutorial_manual", "tutorial_linear", "deg2", "delta2"]
    assert all(row[-1] == "yes" for row in rows.values())  # every result in the tutorial's band
    assert len(list((tmp_path / "outputs" / "reproduce").glob("*/*/metrics.json"))) == 4
    assert "Dashboard: " in proc.stdout


@pytest.mark.parametrize(
    ("given", "says"),
    [
        ("data.batch_size=0", "error: data.batch_size=0: must be a positive integer\n"),
        ("model.lr=abc", "error: Error merging override model.lr=abc\nValue 'abc'"),  # Hydra's own message
        ("nope=1", "error: Could not override 'nope'."),
        ("experiment=deg2", "error: experiment='deg2': reproduce runs each of the tutorial's experiments"),
    ],
)
def test_a_bad_override_is_refused_without_a_traceback(tmp_path, monkeypatch, capsys, given, says):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_:
        raise SystemExit(main([given]))
    assert exit_.value.code == 2
    assert capsys.readouterr().err.startswith(says)
    assert list(tmp_path.iterdir()) == []  # nothing written
