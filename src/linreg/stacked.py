"""Many jobs of a sweep as one stacked model: the members' data, batch orders and weights side by side.

Member j of a group is the single run of its own config: its data from `RegressionDataModule` (its seed,
its generator config), its batch order the permutation of `epoch_seed(seed_j, epoch)`, its update the
tutorial's (`sgd` for `manual`, `nn.Linear`'s affine map + `optim.SGD` for `linear`), worked out for all
members at once with batched matmuls. Members never mix: every op is per member along the first dim,
and a member that diverges is frozen (its gradient zeroed) from the end of that epoch.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn, optim

from linreg.config import MODELS, ConfigError, target_class
from linreg.data import FullBatch, RegressionDataModule, epoch_seed
from linreg.models import HandSGD
from linreg.record import RunRecord, job_config, model_name

# What may differ between the members of one group: numbers with the same shape in every member.
STACKED_KEYS = ("seed", "model.lr", "model.init", "data.delta", "data.deg", "data.w")
INDEX_BYTES = 12  # per sample and member: the epoch's permutation (int32) and its flat row indices (int64)


def uses_ones_column(cfg: DictConfig) -> bool:
    """Whether the job's model class takes the tutorial's column of ones (the manual model)."""
    return target_class("model", cfg.model._target_).uses_ones_column


def group_key(cfg: DictConfig) -> str:
    """What a job shares with the others of its group: its config less the stackable numbers and loggers."""
    plain = job_config(cfg)
    plain.pop("logger", None)
    for key in STACKED_KEYS:
        group, _, name = key.rpartition(".")
        holder = plain.get(group, {}) if group else plain
        if isinstance(holder, dict) and name in holder:
            value = holder.pop(name)
            if key == "data.w":
                holder["w_len"] = len(value)  # a weight vector of another length is another shape
    return json.dumps(plain, sort_keys=True, default=str)


def member_bytes(cfg: DictConfig) -> int:
    """Bytes one member adds to a group: its features and labels (float32), eval output and batch indices."""
    cols = len(cfg.data.w) + 1  # features (with the ones column) and the label
    return int(cfg.data.num_examples) * (4 * (cols + 1) + INDEX_BYTES)


def split_groups(members: list[int], size: int, budget: int, max_size: int | None) -> list[list[int]]:
    """Consecutive chunks of `members`, each within `budget` bytes (at least one member) and `max_size`."""
    per = max(1, budget // max(size, 1))
    if max_size is not None:
        per = min(per, max_size)
    return [members[i : i + per] for i in range(0, len(members), per)]


# ---------------------------------------------------------------- data


class StackedSampler:
    """Each member's index slices of its own permutation per epoch, as row numbers of the stacked data."""

    def __init__(self, num_examples: int, size: int, seeds: Sequence[int]) -> None:
        self.num_examples, self.size, self.seeds = num_examples, size, list(seeds)
        self.epoch = 0
        self.device = torch.device("cpu")

    def set_epoch(self, epoch: int) -> None:
        """Called by Lightning's fit loop with the epoch about to run."""
        self.epoch = epoch

    def __len__(self) -> int:
        return -(-self.num_examples // self.size)

    def permutations(self) -> Tensor:
        """(members, n): what EpochBatchSampler draws for each member's seed this epoch."""
        n = self.num_examples
        dtype = torch.int32 if n < 2**31 else torch.int64  # as EpochBatchSampler (the same permutation)
        gens = (torch.Generator().manual_seed(epoch_seed(s, self.epoch)) for s in self.seeds)
        return torch.stack([torch.randperm(n, generator=g, dtype=dtype) for g in gens])

    def __iter__(self) -> Iterator[Tensor]:
        n = self.num_examples
        offsets = torch.arange(len(self.seeds), dtype=torch.int64).unsqueeze(1) * n
        rows = (self.permutations().to(torch.int64) + offsets).to(self.device)  # member j's rows start at j*n
        for i in range(0, n, self.size):
            yield rows[:, i : i + self.size]


class StackedLoader:
    """The mini-batches of one call for every member: one gather of (members, rows, features), split per step."""

    def __init__(self, dm: StackedDataModule, sampler: StackedSampler, batch_size: int) -> None:
        self.dm, self.sampler, self.batch_size = dm, sampler, batch_size

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self) -> Iterator[list[tuple[Tensor, Tensor]]]:
        x, y = self.dm.x, self.dm.y
        members, n, k = x.shape
        flat_x, flat_y = x.view(members * n, k), y.view(members * n, 1)
        for rows in self.sampler:
            count = rows.shape[1]
            idx = rows.reshape(-1)
            xs = flat_x.index_select(0, idx).view(members, count, k)
            ys = flat_y.index_select(0, idx).view(members, count, 1)
            yield list(zip(xs.split(self.batch_size, 1), ys.split(self.batch_size, 1)))


@dataclass
class MemberData:
    """One member's data as its single run makes it."""

    x: Tensor
    y: Tensor
    ols_mse: float


def member_data(cfg: DictConfig, ones_column: bool) -> MemberData:
    """The single run's DataModule data for this config (ConfigError if it overflows float32)."""
    from linreg.train import check_finite_data

    data_cfg = OmegaConf.to_container(cfg.data, resolve=True)
    dm = RegressionDataModule(**data_cfg, seed=cfg.seed, ones_column=ones_column)
    dm.setup("fit")
    check_finite_data(dm, cfg)
    x, y = dm.full_data()
    return MemberData(x, y, dm.ols_mse())


class StackedDataModule(L.LightningDataModule):
    """Every member's data stacked, (members, n, features) and (members, n, 1), and their batch orders."""

    def __init__(self, x: Tensor, y: Tensor, seeds: Sequence[int], batch_size: int, batches_per_call: int) -> None:
        super().__init__()
        self.x, self.y, self.seeds = x, y, list(seeds)
        self.batch_size, self.batches_per_call = batch_size, batches_per_call
        self.sampler = StackedSampler(x.shape[1], batch_size * batches_per_call, self.seeds)

    def to_device(self, device: torch.device) -> None:
        """Move the data once: every gather then happens where the model is."""
        self.x, self.y = self.x.to(device), self.y.to(device)
        self.sampler.device = device

    def train_dataloader(self) -> StackedLoader:
        return StackedLoader(self, self.sampler, self.batch_size)

    def val_dataloader(self) -> FullBatch:
        return FullBatch(self.x, self.y)

    def transfer_batch_to_device(self, batch: Any, device: torch.device, dataloader_idx: int) -> Any:
        return batch  # made on the model's device already (to_device)


# ---------------------------------------------------------------- model


@dataclass
class History:
    """What the dashboards of a single run would have logged, for all members: (epoch, step, values)."""

    loss: list[tuple[int, int, Tensor]] = field(default_factory=list)
    params: list[tuple[int, int, Tensor]] = field(default_factory=list)
    mse: list[tuple[int, int, Tensor]] = field(default_factory=list)
    start_mse: Tensor | None = None


def linear_init(seed: int, in_features: int, bias: bool, init: str) -> nn.Linear:
    """The single run's nn.Linear: made right after seeding torch with the job's seed (or zeros)."""
    torch.manual_seed(seed)  # what L.seed_everything(seed) does for torch before the single run builds it
    linear = nn.Linear(in_features, 1, bias=bias)
    if init == "zeros":
        nn.init.zeros_(linear.weight)
        if bias:
            nn.init.zeros_(linear.bias)
    return linear


class StackedRegression(L.LightningModule):
    """The manual or linear model of every member at once; each member's update is its single run's."""

    def __init__(
        self,
        name: str,
        in_features: int,
        bias: bool,
        lrs: Sequence[float],
        seeds: Sequence[int],
        inits: Sequence[str],
        log_every_sgd_steps: int,
    ) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.name, self.bias, self.every = name, bias, log_every_sgd_steps
        members = len(lrs)
        self.register_buffer("lr", torch.tensor(list(lrs), dtype=torch.float32).view(members, 1, 1))
        if name == "manual":  # torch.zeros(k, 1) per member: the tutorial's w, the intercept in the ones column
            self.w = nn.Parameter(torch.zeros(members, in_features, 1))
            self.b = None
        else:
            linears = [linear_init(s, in_features, bias, i) for s, i in zip(seeds, inits)]
            self.w = nn.Parameter(torch.stack([m.weight.detach().T for m in linears]))  # (members, k, 1)
            self.b = nn.Parameter(torch.stack([m.bias.detach() for m in linears]).view(members, 1, 1)) if bias else None
        self.active = torch.ones(members, dtype=torch.bool)
        self.diverged_epoch: list[int | None] = [None] * members
        self.stop_step: list[int | None] = [None] * members
        self.history = History()
        self.logged_at = -1

    def forward(self, x: Tensor) -> Tensor:
        """(members, m, k) -> (members, m, 1): `linreg(X, w)`, or nn.Linear's `x @ W.T + b`, per member."""
        if self.name == "linear" and self.b is not None:
            return torch.baddbmm(self.b, x, self.w)
        return torch.bmm(x, self.w)

    def configure_optimizers(self) -> optim.Optimizer:
        if self.name == "manual":
            return HandSGD([self.w], lr=self.lr)  # the tutorial's sgd: w.data -= lr * w.grad, lr per member
        # optim.SGD has one lr per tensor: each member's gradient is scaled by its lr first (update_linear).
        return optim.SGD([p for p in (self.w, self.b) if p is not None], lr=1.0)

    def member_loss(self, x: Tensor, y: Tensor) -> Tensor:
        """Each member's mean squared error on its mini-batch: `squared_loss` / `nn.MSELoss()`."""
        return ((self.forward(x) - y) ** 2).sum(dim=(1, 2)) / y[0].numel()

    def training_step(self, batch: list[tuple[Tensor, Tensor]], batch_idx: int) -> None:
        opt = self.optimizers()
        frozen = not bool(self.active.all())
        mask = (~self.active).to(self.device).view(-1, 1, 1) if frozen else None
        for step, (x, y) in enumerate(batch, start=self.trainer.global_step):
            if self.name == "linear":
                opt.zero_grad()
            loss = self.member_loss(x, y)
            loss.sum().backward()  # members are independent: d(sum)/d(w_j) is d(loss_j)/d(w_j)
            self.prepare_grads(mask)
            opt.step()  # through Lightning, so global_step counts SGD steps as in a single run
            if step % self.every == 0:
                self.history.loss.append((self.current_epoch, step, loss.detach().cpu()))

    def prepare_grads(self, mask: Tensor | None) -> None:
        """Zero the gradients of frozen members (NaN * 0 is NaN: a fill, not a product); scale linear's by lr."""
        for p in (self.w, getattr(self, "b", None)):
            if p is None or p.grad is None:
                continue
            if mask is not None:
                p.grad.masked_fill_(mask, 0.0)
            if self.name == "linear":
                p.grad.mul_(self.lr)

    def weights(self) -> Tensor:
        """(members, coefficients) in the tutorial's order: feature weights, then intercept."""
        w = self.w.detach().flatten(1)
        if self.name == "linear" and self.b is not None:
            w = torch.cat((w, self.b.detach().flatten(1)), 1)
        return w

    def full_mse(self) -> Tensor:
        """Each member's MSE on its whole data set now."""
        dm = self.trainer.datamodule
        with torch.no_grad():
            return ((self.forward(dm.x) - dm.y) ** 2).sum(dim=(1, 2)) / dm.y[0].numel()

    def record_params(self) -> None:
        """`params/*` of every member at this step (once per step), as the Dashboard logs them."""
        step = self.trainer.global_step
        if step != self.logged_at:
            self.history.params.append((self.current_epoch, step, self.weights().to("cpu", copy=True)))
            self.logged_at = step

    def on_fit_start(self) -> None:
        self.trainer.datamodule.to_device(self.device)

    def on_train_start(self) -> None:
        self.history.start_mse = self.full_mse().cpu()
        self.record_params()

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.trainer.global_step // self.every > self.logged_at // self.every:
            self.record_params()

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        mse = self.full_mse().cpu()
        epoch, step = self.current_epoch, self.trainer.global_step
        self.history.mse.append((epoch, step, mse))
        self.record_params()
        finite = torch.isfinite(mse) & torch.isfinite(self.weights().cpu()).all(dim=1)
        for j in torch.nonzero(self.active & ~finite).flatten().tolist():
            # A single run stops here: this member keeps this epoch's numbers and takes no more steps.
            self.diverged_epoch[j], self.stop_step[j] = epoch, step
        self.active &= finite
        if not bool(self.active.any()):
            self.trainer.should_stop = True


# ---------------------------------------------------------------- results


@dataclass
class MemberResult:
    """One member's run record and the logs its single run would have written."""

    record: RunRecord
    history: dict[str, list[tuple[int, list[float]]]]  # tag -> [(step, values)]
    start_mse: float


def member_history(h: History, j: int, last_epoch: int) -> dict[str, list[tuple[int, list[float]]]]:
    """Member j's (step, values) per series, up to the epoch it stopped in."""

    def take(rows: list[tuple[int, int, Tensor]]) -> list[tuple[int, list[float]]]:
        return [(step, values[j].reshape(-1).tolist()) for epoch, step, values in rows if epoch <= last_epoch]

    return {"train/loss": take(h.loss), "params": take(h.params), "train/mse": take(h.mse)}


def member_results(
    cfgs: Sequence[DictConfig], module: StackedRegression, ols: Sequence[float], steps: int, seconds: float
) -> list[MemberResult]:
    """Every member's metrics.json content (the single run's schema) and history."""
    weights = module.weights().cpu()
    epochs_run = len(module.history.mse)
    results = []
    for j, cfg in enumerate(cfgs):
        diverged = module.diverged_epoch[j]
        last = diverged if diverged is not None else epochs_run - 1
        epoch_mse = [float(m[j]) for _, _, m in module.history.mse[: last + 1]]
        record = RunRecord.of(
            cfg,
            "ok" if diverged is None else "diverged",
            epoch_mse=epoch_mse,
            train_mse=epoch_mse[-1] if epoch_mse else None,
            weights=weights[j].tolist(),
            ols_mse=ols[j],
            steps=module.stop_step[j] if diverged is not None else steps,
            fit_seconds=seconds / len(cfgs),  # the member's share of the group's fit
            diverged_epoch=diverged,
        )
        start = float(module.history.start_mse[j]) if module.history.start_mse is not None else math.nan
        results.append(MemberResult(record, member_history(module.history, j, last), start))
    return results


def build_trainer(cfg: DictConfig) -> L.Trainer:
    """A bare Trainer for a group: no loggers, checkpoints or bars (each member's logs are written after)."""
    t = cfg.trainer
    trainer = L.Trainer(
        accelerator=t.accelerator,
        devices=t.devices,
        max_epochs=t.max_epochs,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        log_every_n_steps=1,
        deterministic=t.deterministic,
    )
    return trainer


def stack_data(
    cfgs: Sequence[DictConfig], ones_column: bool
) -> tuple[Tensor, Tensor, list[float], dict[int, Exception]]:
    """Each member's data made as its single run makes it, copied into one (members, n, k) buffer.

    A member whose data overflows float32 is left out (its ConfigError returned by position).
    """
    x = y = None
    ols: list[float] = []
    failed: dict[int, Exception] = {}
    kept = 0
    for j, cfg in enumerate(cfgs):
        try:
            d = member_data(cfg, ones_column)
        except ConfigError as err:
            failed[j] = err
            continue
        if x is None:  # allocated once the first member's shape is known: at most one member's data extra
            x = torch.empty(len(cfgs), *d.x.shape)
            y = torch.empty(len(cfgs), *d.y.shape)
        x[kept], y[kept] = d.x, d.y
        ols.append(d.ols_mse)
        kept += 1
    if x is None or y is None:
        return torch.empty(0), torch.empty(0), ols, failed
    return x[:kept], y[:kept], ols, failed


def train_group(cfgs: Sequence[DictConfig]) -> list[MemberResult | Exception]:
    """Train the group's members as one stacked model in one `Trainer.fit`; a result (or error) per member."""
    from linreg.train import torch_threads

    with torch_threads(cfgs[0].threads):  # the same reductions whichever process runs the group
        return train_members(cfgs)


def train_members(cfgs: Sequence[DictConfig]) -> list[MemberResult | Exception]:
    """`train_group`'s work, with the group's thread count set."""
    first = cfgs[0]
    if first.model._target_ not in MODELS:
        allowed = f"the vectorized launcher stacks {' and '.join(MODELS)} only"
        raise ConfigError("model._target_", first.model._target_, allowed)
    name = model_name(first.model._target_)
    x, y, ols, failed = stack_data(cfgs, uses_ones_column(first))
    good = [c for j, c in enumerate(cfgs) if j not in failed]
    if not good:
        return [failed[j] for j in range(len(cfgs))]
    seeds = [int(c.seed) for c in good]
    dm = StackedDataModule(x, y, seeds, first.data.batch_size, first.data.batches_per_call)
    module = StackedRegression(
        name,
        in_features=x.shape[2],
        bias=bool(first.data.bias),
        lrs=[float(c.model.lr) for c in good],
        seeds=seeds,
        inits=[str(c.model.get("init", "default")) for c in good],
        log_every_sgd_steps=first.model.log_every_sgd_steps,
    )
    trainer = build_trainer(first)
    start = time.perf_counter()
    trainer.fit(module, datamodule=dm)
    seconds = time.perf_counter() - start
    results = iter(member_results(good, module, ols, trainer.global_step, seconds))
    return [failed[j] if j in failed else next(results) for j in range(len(cfgs))]


# ---------------------------------------------------------------- a member's logs


def write_member_logs(cfg: DictConfig, out: Path, label: str, result: MemberResult) -> None:
    """The member's TensorBoard run (and CSV) with the single run's tags: train/*, params/*, HParams (no graph)."""
    from lightning.pytorch.loggers import TensorBoardLogger

    from linreg.dashboard import hparams_summaries, param_names
    from linreg.train import build_loggers

    loggers = build_loggers(cfg, out, label)
    if not loggers:
        return
    m = result.record
    ols = m.ols_mse
    start = {"hp/train_mse": result.start_mse, "hp/ols_gap": result.start_mse - ols}
    tb = next((lg for lg in loggers if isinstance(lg, TensorBoardLogger)), None)
    end_summary = None
    n_coef = len(m.weights or m.true_weights)
    names = param_names(n_coef, bool(cfg.data.bias))
    in_features = n_coef if uses_ones_column(cfg) or not cfg.data.bias else n_coef - 1
    for lg in loggers:
        lg.log_hyperparams(hparams_of(cfg, in_features))
    if tb is not None:
        experiment, session_start, end_summary = hparams_summaries(m.hparams(), start)
        # Into this run's own event file, as the Dashboard writes it (add_hparams would make a run of its own).
        tb.experiment.file_writer.add_summary(experiment)
        tb.experiment.file_writer.add_summary(session_start)
    log_all(loggers, start, 0)
    h = result.history
    for step, values in h["params"]:
        log_all(loggers, dict(zip([f"params/{n}" for n in names], values)), step)
    for tag in ("train/loss", "train/mse"):
        for step, values in h[tag]:
            log_all(loggers, {tag: values[0]}, step)
    final = m.epoch_mse[-1] if m.epoch_mse and m.epoch_mse[-1] is not None else math.nan
    log_all(loggers, {"hp/train_mse": final, "hp/ols_gap": final - ols}, max(m.steps, 1))
    if tb is not None and end_summary is not None:
        tb.experiment.file_writer.add_summary(end_summary)
    for lg in loggers:
        lg.finalize("success")


def hparams_of(cfg: DictConfig, in_features: int) -> dict[str, Any]:
    """What Lightning logs as a single run's hparams: the DataModule's and the module's saved arguments."""
    data = OmegaConf.to_container(cfg.data, resolve=True)
    model = {k: v for k, v in OmegaConf.to_container(cfg.model, resolve=True).items() if k != "_target_"}
    return {**data, "seed": cfg.seed, "ones_column": uses_ones_column(cfg), "in_features": in_features, **model}


def log_all(loggers: Sequence[Any], metrics: dict[str, float], step: int) -> None:
    """One `log_metrics` call per logger, as `linreg.models.log_scalars` does for a single run."""
    for lg in loggers:
        lg.log_metrics(metrics, step=step)
