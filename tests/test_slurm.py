"""The submitit_slurm launcher against a real SLURM cluster, and `scripts/slurm-local.sh`'s own checks.

The cluster tests are `system` tests (`make test-all`, after `scripts/slurm-local.sh start` and
`eval "$(scripts/slurm-local.sh env)"`, as .ci/run does); each skips, saying why, without a cluster that answers.
The script's refusals of planted state dirs and pid files need root but no SLURM: they run in `make test`.
"""

import csv
import ipaddress
import json
import os
import pwd
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import REPO, run_cli

SCRIPTS = REPO / "scripts"
SLURM_LOCAL = SCRIPTS / "slurm-local.sh"
PARTITION = "debug"  # scripts/slurm-local.sh's only partition


def cluster_problem() -> str | None:
    """Why no SLURM cluster is usable here, or None when one answers with an idle `debug` partition."""
    if shutil.which("sbatch") is None:
        return "sbatch not on PATH (install: scripts/slurm-local.sh install)"
    if not os.environ.get("SLURM_CONF"):
        return "SLURM_CONF unset (start a cluster: scripts/slurm-local.sh start, then export what it prints)"
    try:
        ping = subprocess.run(["scontrol", "ping"], capture_output=True, text=True, timeout=30)
        states = subprocess.run(
            ["sinfo", "-h", "-p", PARTITION, "-o", "%t"], capture_output=True, text=True, timeout=30
        ).stdout.split()
    except (OSError, subprocess.TimeoutExpired) as err:
        return f"SLURM clients failed: {err}"
    if ping.returncode != 0 or "UP" not in ping.stdout:
        return f"slurmctld not answering: {(ping.stdout + ping.stderr).strip()}"
    if not any(s.rstrip("*~#") in ("idle", "mix", "alloc") for s in states):
        return f"no usable node in partition {PARTITION!r} (states: {states})"
    return None


@pytest.fixture(scope="module")
def slurm() -> dict[str, str]:
    """The environment for SLURM's clients: the cluster's, with the sacct stand-in first on PATH."""
    if (problem := cluster_problem()) is not None:
        pytest.skip(problem)
    # Without slurmdbd the real sacct fails; the stand-in lets submitit see hard-dead jobs instead of hanging.
    return {**os.environ, "PATH": f"{SCRIPTS}{os.pathsep}{os.environ['PATH']}"}


def job_states(job_id: str, env: dict[str, str]) -> dict[str, tuple[str, str]]:
    """{array task id: (state, node)} of a SLURM job, as the sacct stand-in reads them from scontrol."""
    out = subprocess.run(
        [str(SCRIPTS / "sacct"), "-o", "JobID,State,NodeList", "--parsable2", "-j", job_id],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    ).stdout
    rows = [line.split("|") for line in out.splitlines()[1:]]
    return {task: (state, node) for task, state, node in rows}


@pytest.mark.system
@pytest.mark.timeout(400)
def test_grid_runs_as_slurm_array(slurm: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A 2-job grid through `hydra/launcher=slurm`: one array job, every task COMPLETED, every job's metrics ok."""
    monkeypatch.setenv("PATH", slurm["PATH"])  # run_cli passes os.environ to the CLI (and so to submitit)
    sweep = tmp_path / "sweep"  # submitit's folder is under it: the node (this host) sees it
    grid = ["model=manual,linear"]
    proc = run_cli(
        *("-m", "linreg.train", "-m"),
        "hydra/launcher=slurm",
        f"hydra.launcher.partition={PARTITION}",
        "hydra.launcher.mem_gb=1",  # exercises --mem: needs the node's RealMemory
        "hydra.launcher.timeout_min=10",
        f"hydra.sweep.dir={sweep}",
        *grid,
        "data.num_examples=100",
        "trainer.max_epochs=1",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]

    metrics = {int(d.name): json.loads((d / "metrics.json").read_text()) for d in sweep.iterdir() if d.name.isdigit()}
    assert sorted(metrics) == [0, 1]
    assert {m["model"] for m in metrics.values()} == {"manual", "linear"}
    for m in metrics.values():
        assert m["status"] == "ok", m
        assert m["steps"] == 10  # 100 samples, batch 10, 1 epoch
        assert m["train_mse"] is not None and m["train_mse"] < 10

    # The jobs ran on the cluster: one array job, its tasks finished on this node.
    submitted = sorted(p.name for p in (sweep / ".submitit").iterdir() if re.fullmatch(r"\d+_\d+", p.name))
    array_id = submitted[0].split("_")[0]
    assert submitted == [f"{array_id}_0", f"{array_id}_1"]
    node = subprocess.run(["hostname", "-s"], capture_output=True, text=True, check=True).stdout.strip()
    # submitit reads a task's result as soon as the task writes it; SLURM marks it COMPLETED when the step exits.
    want = {task: ("COMPLETED", node) for task in submitted}
    deadline = time.monotonic() + 60
    while (got := {task: job_states(array_id, slurm).get(task) for task in submitted}) != want:
        if time.monotonic() > deadline or any(
            state not in ("RUNNING", "COMPLETING", "COMPLETED") for state, _ in filter(None, got.values())
        ):
            break
        time.sleep(1)
    assert got == want

    # The multirun callback's table, built in the submitting process from the jobs' metrics.json.
    assert (sweep / "results.md").is_file()
    with (sweep / "results.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(metrics)
    assert sorted(r["status"] for r in rows) == ["ok", "ok"]
    assert sorted(r["model"] for r in rows) == ["linear", "manual"]
    by_model = {m["model"]: m for m in metrics.values()}
    for r in rows:
        assert float(r["train_mse"]) == pytest.approx(by_model[r["model"]]["train_mse"], rel=1e-6)


@pytest.mark.system
@pytest.mark.timeout(180)
def test_hard_dead_job_is_reported(slurm: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A job killed without a result file ends submitit's wait with an error (via the sacct stand-in), not a hang."""
    submitit = pytest.importorskip("submitit")
    monkeypatch.setenv("PATH", slurm["PATH"])
    executor = submitit.AutoExecutor(folder=tmp_path / "submitit", cluster="slurm")
    executor.update_parameters(slurm_partition=PARTITION, timeout_min=5, cpus_per_task=1)
    job = executor.submit(os._exit, 3)  # dies before submitit can write a result
    # Without a working sacct this waits forever (pytest-timeout ends it); the watcher polls at 2, 4, 8, ... s.
    with pytest.raises(submitit.core.utils.UncompletedJobError):
        job.result()
    assert job.state == "FAILED"


@pytest.mark.system
@pytest.mark.timeout(600)
def test_vectorized_groups_are_array_tasks_and_a_dead_one_resumes(
    slurm: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`hydra/launcher=vectorized_slurm`: a task per stacked group; a task that dies leaves its group's jobs missing,
    `resume=true` trains that group alone; the files and numbers are the local vectorized launcher's."""
    monkeypatch.setenv("PATH", slurm["PATH"])
    grid = ["model=manual,linear", "model.lr=0.03,100", "seed=1,2", "data.num_examples=100", "trainer.max_epochs=2"]
    slurm_args = ["hydra/launcher=vectorized_slurm", f"hydra.launcher.partition={PARTITION}", "hydra.launcher.mem_gb=1"]
    sweep, local = tmp_path / "sweep", tmp_path / "local"
    dies = 'hydra.launcher.setup=["test $SLURM_ARRAY_TASK_ID != 1 || exit 3"]'  # the linear group's task, at its start
    proc = run_cli("-m", "linreg.train", "-m", *slurm_args, dies, *grid, f"hydra.sweep.dir={sweep}")
    assert proc.returncode == 1 and "4 of 8 jobs did not finish" in proc.stderr, proc.stderr[-3000:]
    assert "8 jobs in 2 groups: array job" in proc.stdout + proc.stderr
    kept = {p: p.stat().st_mtime_ns for p in sweep.glob("*/metrics.json")}
    assert sorted(p.parent.name for p in kept) == ["0", "1", "2", "3"]  # the manual group's task finished

    proc = run_cli("-m", "linreg.train", "-m", *slurm_args, *grid, f"hydra.sweep.dir={sweep}", "resume=true")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "4 jobs in 1 groups: array job" in proc.stdout + proc.stderr  # the dead group only, as one task
    assert {p: p.stat().st_mtime_ns for p in kept} == kept

    proc = run_cli("-m", "linreg.train", "-m", "hydra/launcher=vectorized", *grid, f"hydra.sweep.dir={local}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    for job in map(str, range(8)):
        got, want = (json.loads((d / job / "metrics.json").read_text()) for d in (sweep, local))
        assert (got["status"], got["steps"], got["config"]) == (want["status"], want["steps"], want["config"])
        assert got["weights"] == pytest.approx(want["weights"], rel=1e-5, nan_ok=True)
        overrides = [(d / job / ".hydra" / "overrides.yaml").read_text().splitlines() for d in (sweep, local)]
        assert [o for o in overrides[0] if "resume=" not in o] == overrides[1]  # the resume wrote them again
        assert (sweep / job / "train.log").stat().st_size > 0 and any((sweep / job / "tensorboard").iterdir())
    with (sweep / "results.csv").open(newline="") as f:
        assert sorted(r["status"] for r in csv.DictReader(f)) == ["diverged"] * 4 + ["ok"] * 4


# --- scripts/slurm-local.sh as root: what another user plants in its state dir is not trusted ---

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="slurm-local.sh start/stop run as root only")


def slurm_local(command: str, state_dir: Path, path: str | None = None) -> subprocess.CompletedProcess:
    """`scripts/slurm-local.sh COMMAND` on its own state dir (never the one a running cluster uses)."""
    env = {**os.environ, "SLURM_LOCAL_DIR": str(state_dir), "PATH": path or os.environ["PATH"]}
    return subprocess.run([str(SLURM_LOCAL), command], capture_output=True, text=True, timeout=120, env=env)


@pytest.fixture
def stub_slurm(tmp_path: Path) -> str:
    """A PATH whose `slurmctld` is a stub that only fails loudly: `start` gets past its "is SLURM installed"
    check without SLURM, and the test fails if the script runs a daemon at all."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    stub = bin_dir / "slurmctld"
    stub.write_text("#!/bin/sh\necho 'stub slurmctld: the script ran a daemon' >&2\nexit 1\n")
    stub.chmod(0o755)
    return f"{bin_dir}{os.pathsep}{os.environ['PATH']}"


def processes_naming(path: Path) -> list[str]:
    """Command lines of the processes whose arguments mention path (a daemon started on that state dir)."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if str(path) in cmdline and "pytest" not in cmdline:
            found.append(cmdline)
    return found


def plant(kind: str, tmp_path: Path) -> tuple[Path, Path]:
    """A state dir as another user could leave it, and the victim file that a write through it would hit."""
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "slurm.conf").write_text("precious\n")
    state = tmp_path / "state"
    if kind == "symlink":
        state.symlink_to(victim)
    elif kind == "other-owner":
        state.mkdir()
        (state / "slurm.conf").symlink_to(victim / "slurm.conf")
        os.chown(state, 65534, 65534)  # nobody
    elif kind == "world-writable":
        state.mkdir()
        state.chmod(0o777)
        (state / "slurm.conf").symlink_to(victim / "slurm.conf")
    elif kind == "foreign":  # root's own, not empty, not made by the script: never emptied
        state.mkdir()
        (state / "data").write_text("keep\n")
    return state, victim


@needs_root
@pytest.mark.parametrize(
    ("command", "kind", "reason"),
    [
        ("start", "symlink", "it is a symlink"),
        ("start", "other-owner", "owned by uid 65534"),
        ("start", "world-writable", "lets other users write"),
        ("start", "foreign", "not made by"),
        ("stop", "symlink", "it is a symlink"),
        ("stop", "other-owner", "owned by uid 65534"),
        ("stop", "world-writable", "lets other users write"),
    ],
)
def test_planted_state_dir_is_refused(command: str, kind: str, reason: str, tmp_path: Path, stub_slurm: str) -> None:
    """A state dir that is a symlink, someone else's, writable by others or not the script's: one line, exit 1."""
    state, victim = plant(kind, tmp_path)
    before = {p.name: p.read_bytes() for p in state.iterdir()} if kind == "foreign" else None
    proc = slurm_local(command, state, path=stub_slurm)
    assert proc.returncode == 1, proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and proc.stdout == "", proc.stdout + proc.stderr
    assert lines[0].startswith(f"slurm-local: refusing state dir {state}") and reason in lines[0], lines[0]
    # Nothing was written through it, and no daemon was started on it.
    assert sorted(p.name for p in victim.iterdir()) == ["slurm.conf"]
    assert (victim / "slurm.conf").read_text() == "precious\n"
    if before is not None:
        assert {p.name: p.read_bytes() for p in state.iterdir()} == before
    assert processes_naming(state) == []
    assert processes_naming(victim) == []


@needs_root
def test_planted_pid_file_is_not_killed(tmp_path: Path) -> None:
    """stop leaves alone a process that a planted pid file names (not this dir's daemon), and says so."""
    state = tmp_path / "state"
    (state / "run").mkdir(parents=True)
    (state / ".slurm-local").touch()  # a dir the script made (a foreign one is refused before anything is read)
    bystander = subprocess.Popen(["sleep", "100"])
    try:
        for name in ("slurmd", "slurmctld", "munged"):
            (state / "run" / f"{name}.pid").write_text(f"{bystander.pid}\n")
        proc = slurm_local("stop", state)
        assert proc.returncode == 0, proc.stderr
        assert bystander.poll() is None, "stop killed the process a planted pid file named"
        for name in ("slurmd", "slurmctld", "munged"):
            assert f"ignoring {state}/run/{name}.pid: pid {bystander.pid} is " in proc.stderr, proc.stderr
    finally:
        bystander.kill()
        bystander.wait()


@pytest.mark.system
@needs_root
def test_pid_file_of_another_cluster_is_not_killed(slurm: dict[str, str], tmp_path: Path) -> None:
    """A pid file naming the running cluster's own slurmctld, planted in another state dir, kills nothing."""
    run_dir = Path(os.environ["SLURM_CONF"]).parent / "run"
    pid = int((run_dir / "slurmctld.pid").read_text())
    state = tmp_path / "state"
    (state / "run").mkdir(parents=True)
    (state / ".slurm-local").touch()  # made by the script, as a copied or stale state dir would be
    (state / "run" / "slurmctld.pid").write_text(f"{pid}\n")
    proc = slurm_local("stop", state)
    assert proc.returncode == 0, proc.stderr
    assert f"ignoring {state}/run/slurmctld.pid: pid {pid} is " in proc.stderr, proc.stderr
    assert Path(f"/proc/{pid}").exists()
    assert cluster_problem() is None


# --- a running cluster: private state dir, connections from loopback only ---


def conf_value(key: str) -> str | None:
    """A `Key=value` setting of the cluster's slurm.conf (the first one), or None."""
    for line in Path(os.environ["SLURM_CONF"]).read_text().splitlines():
        name, _, value = line.partition("=")
        if name.strip().lower() == key.lower():
            return value.split("#")[0].strip()
    return None


def listening_addresses(port: int) -> list[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    """Local addresses of the TCP sockets listening on port, from /proc/net/tcp and tcp6."""
    found = []
    for table, size in (("tcp", 4), ("tcp6", 16)):
        path = Path("/proc/net") / table
        if not path.exists():
            continue
        for line in path.read_text().splitlines()[1:]:
            fields = line.split()
            addr, hex_port = fields[1].split(":")
            if fields[3] != "0A" or int(hex_port, 16) != port:  # 0A: LISTEN
                continue
            raw = bytes.fromhex(addr)
            # The kernel prints each 32-bit word in host (little-endian) order.
            raw = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
            found.append(ipaddress.ip_address(raw) if size == 16 else ipaddress.IPv4Address(raw))
    return found


def loopback_only(addr: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """True when a socket bound to addr can be reached from this machine only."""
    mapped = getattr(addr, "ipv4_mapped", None)
    return (mapped or addr).is_loopback


@pytest.mark.system
def test_daemons_take_loopback_connections_only(slurm: dict[str, str]) -> None:
    """slurmctld's and slurmd's ports: bound to loopback addresses, or dropped by iptables on other interfaces."""
    ctld_port = int(conf_value("SlurmctldPort") or 6817)
    slurmd_port = int(conf_value("SlurmdPort") or 6818)
    rules = None
    for port in (ctld_port, slurmd_port):
        addrs = listening_addresses(port)
        assert addrs, f"nothing listens on port {port} while the cluster answers"
        if all(loopback_only(a) for a in addrs):
            continue
        if rules is None:
            try:
                rules = subprocess.run(["iptables", "-S", "INPUT"], capture_output=True, text=True, check=True).stdout
            except (OSError, subprocess.CalledProcessError) as err:
                pytest.fail(f"port {port} listens on {[str(a) for a in addrs]} and iptables cannot be read: {err}")
        rule = f"-A INPUT ! -i lo -p tcp -m tcp --dport {port} -j DROP"
        assert rule in rules.splitlines(), f"port {port} listens on {[str(a) for a in addrs]} with no rule {rule!r}"


@pytest.mark.system
def test_state_dir_is_private(slurm: dict[str, str]) -> None:
    """The running cluster's state dir (slurm-local.sh's) is root's 0711, its munge dir munge's, no symlinks."""
    state = Path(os.environ["SLURM_CONF"]).parent
    if not (state / ".slurm-local").exists():
        pytest.skip(f"{state} is not a scripts/slurm-local.sh state dir")
    st = state.lstat()
    assert (st.st_uid, oct(st.st_mode & 0o7777)) == (0, "0o711")
    munge = (state / "munge").lstat()
    assert (munge.st_uid, oct(munge.st_mode & 0o7777)) == (pwd.getpwnam("munge").pw_uid, "0o711")
    links = [p for d in (state, state / "run", state / "munge") for p in d.iterdir() if p.is_symlink()]
    assert links == []
