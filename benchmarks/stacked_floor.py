"""`python -m benchmarks.stacked_floor`: the vectorized launcher against what stacking itself costs (issue 21).

The floor is a plain PyTorch loop (nothing from `linreg`, like `benchmarks/tutorial_loops.py`) that trains the
same members stacked: each member its own `tensorGenReg` data under its seed and its own batch order (a
permutation per epoch from its seed), one batched matmul a step for all of them, the tutorial's `sgd` update with
each member's lr, a full-data MSE per epoch. The workloads: the manual model, 3 epochs, batch 10, 5,000 samples,
10 lr x 20 seeds (200 jobs) and 10 lr x 100 seeds (1,000 jobs). Floor and launcher run as whole processes
(imports included), alternated round by round; the ratio is the median of the rounds' vectorized/floor, and the
peak RSS is each process's own (`wait4`).
"""

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.overhead import REPO, config_threads, machine
from benchmarks.tutorial_loops import tensor_gen_reg

LRS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.03, 0.05, 0.07, 0.1, 0.2)
SEEDS = {200: 20, 1000: 100}  # jobs -> seeds per lr
NUM_EXAMPLES, EPOCHS, BATCH = 5000, 3, 10


def floor(jobs: int) -> list[float]:
    """Train the `jobs` members stacked in this process; their final full-data MSEs."""
    import torch

    torch.set_num_threads(config_threads())  # the launcher's runs use the project's thread count
    members = [(lr, seed) for lr in LRS for seed in range(SEEDS[jobs])]
    data = [tensor_gen_reg(NUM_EXAMPLES, generator=torch.Generator().manual_seed(seed)) for _, seed in members]
    x, y = torch.stack([d[0] for d in data]), torch.stack([d[1] for d in data])  # (M, n, 3), (M, n, 1)
    del data
    lr = torch.tensor([lr for lr, _ in members]).view(-1, 1, 1)
    w = torch.zeros(len(members), x.shape[2], 1, requires_grad=True)
    rows = torch.arange(len(members)).view(-1, 1)
    for epoch in range(EPOCHS):
        # Each member's own order: a permutation from its seed and the epoch.
        perms = torch.stack(
            [
                torch.randperm(NUM_EXAMPLES, generator=torch.Generator().manual_seed(s * 1_000_003 + epoch))
                for _, s in members
            ]
        )
        for i in range(0, NUM_EXAMPLES, BATCH):
            idx = perms[:, i : i + BATCH]
            y_hat = torch.bmm(x[rows, idx], w)  # linreg(X, w) for every member
            loss = ((y_hat - y[rows, idx]) ** 2).sum((1, 2)) / idx.shape[1]  # squared_loss, one per member
            loss.sum().backward()  # each member's gradient is its own loss's
            w.data -= lr * w.grad  # the tutorial's sgd
            w.grad.zero_()
        with torch.no_grad():
            mse = ((torch.bmm(x, w) - y) ** 2).mean((1, 2))
    return mse.tolist()


def vectorized_args(jobs: int, sweep_dir: Path) -> list[str]:
    """The same workload as a `hydra/launcher=vectorized` sweep (default config: TensorBoard on)."""
    lrs = ",".join(map(str, LRS))
    return [
        "-m", "linreg.train", "-m", "hydra/launcher=vectorized", "model=manual", f"data.num_examples={NUM_EXAMPLES}",
        f"trainer.max_epochs={EPOCHS}", f"data.batch_size={BATCH}", f"model.lr={lrs}", f"seed=range(0,{SEEDS[jobs]})",
        f"hydra.sweep.dir={sweep_dir}",
    ]  # fmt: skip


def process(args: list[str]) -> tuple[float, float]:
    """Wall seconds and peak RSS (GiB) of one whole Python process."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "HYDRA_FULL_ERROR": "1"}
    start = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, *args], cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    err = proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} exited {proc.returncode}:\n{err.decode()[-2000:]}")
    return seconds, usage.ru_maxrss / 2**20  # KiB on Linux


def main(argv: list[str] | None = None) -> int:
    """Alternate floor and launcher per workload and round; print the ratio table."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--jobs", type=int, choices=sorted(SEEDS), action="append", help="a workload (default both)")
    p.add_argument("--floor", type=int, choices=sorted(SEEDS), help=argparse.SUPPRESS)  # one floor process
    args = p.parse_args(argv)
    if args.floor:
        floor(args.floor)
        return 0
    print(f"machine: {machine()}")
    times: dict[tuple[int, str], list[tuple[float, float]]] = {}
    with tempfile.TemporaryDirectory(prefix="linreg-floor-") as tmp:
        for r in range(args.rounds):
            for jobs in args.jobs or sorted(SEEDS):
                times.setdefault((jobs, "floor"), []).append(
                    process(["-m", "benchmarks.stacked_floor", f"--floor={jobs}"])
                )
                sweep = vectorized_args(jobs, Path(tmp) / f"{jobs}-{r}")
                times.setdefault((jobs, "vectorized"), []).append(process(sweep))
            print(f"  round {r + 1}/{args.rounds} done (load {os.getloadavg()[0]:.2f})", file=sys.stderr, flush=True)
    print(f"\nmanual model, {EPOCHS} epochs, batch {BATCH}, {NUM_EXAMPLES:,} samples; {args.rounds} rounds")
    print("| jobs | floor s | vectorized s | vectorized/floor (per round) | peak RSS floor / vectorized |")
    print("|---|---|---|---|---|")
    for jobs in args.jobs or sorted(SEEDS):
        fl, vec = times[(jobs, "floor")], times[(jobs, "vectorized")]
        ratios = [v[0] / f[0] for f, v in zip(fl, vec)]
        each = " / ".join(f"{x:.2f}" for x in ratios)
        mem = f"{max(m for _, m in fl):.2f} / {max(m for _, m in vec):.2f} GiB"
        seconds = [f"{statistics.median(t for t, _ in side):.2f}" for side in (fl, vec)]
        print(f"| {jobs:,} | {' | '.join(seconds)} | **{statistics.median(ratios):.2f}x** ({each}) | {mem} |")
    print(f"load average after: {', '.join(f'{v:.2f}' for v in os.getloadavg())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
