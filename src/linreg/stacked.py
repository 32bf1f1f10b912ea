"""Many jobs of a sweep trained as one model: each member is its single run, side by side in one `Trainer.fit`.

Member j gets its single run's data, initial model and batch order. Every step runs the model's own forward and
loss for all members' stacked parameters, `vmap` over `functional_call` (PyTorch's "model ensembling" tutorial),
then the tutorial's `sgd` with one lr per member: each gets the gradient of its own loss. A member that diverges
keeps the numbers of the epoch its single run stops in; one its Optuna pruner stops leaves the stack.
"""

from __future__ import annotations

import bisect
import contextlib
import copy
import json
import math
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torch import Tensor, nn
from torch.func import functional_call, stack_module_state, vmap

from linreg import fastpath
from linreg.config import Config, ConfigError
from linreg.dashboard import hp_metrics, hparams, param_names, start_hparams
from linreg.data import EpochBatchSampler
from linreg.models import HandSGD, RegressionModule, log_interval, squared_loss
from linreg.record import RunRecord, identity, write_atomic
from linreg.run import build_datamodule, build_loggers, build_model, build_trainer, model_class, torch_threads

Curves = dict[str, tuple[list[int], Tensor]]  # tag -> (steps, (steps, one value per coefficient or one))
Report = Callable[[int, int, float], bool]  # (member or job j, epoch from 1, its train/mse) -> its pruner stops it


def group_key(cfg: Config) -> str:
    """What a job shares with the rest of its group: its config less loggers and the numbers members differ in."""
    plain = copy.deepcopy(identity(cfg))  # identity of plain data shares its parts
    plain["data"]["w"] = len(plain["data"]["w"])  # a weight vector of another length is another shape
    for key in ("logger", "seed", "model.lr", "model.init", "data.delta", "data.deg"):  # members' own numbers
        group, _, name = key.rpartition(".")
        (plain[group] if group else plain).pop(name, None)
    return json.dumps(plain, sort_keys=True, default=str)


def member_bytes(cfg: Config) -> int:
    """Bytes one member adds to its group: its data (float32) twice while stacked, and its epoch's permutation."""
    return 4 * cfg["data"]["num_examples"] * (2 * (len(cfg["data"]["w"]) + 1) + 1)


class StackedBatches:
    """Each call's rows, (members, rows): each member's drawn by its single run's sampler, its mini-batches in order."""

    def __init__(self, samplers: Sequence[EpochBatchSampler], batch_size: int) -> None:
        self.samplers, self.batch_size = samplers, batch_size
        self.sampler = self  # Lightning calls `loader.sampler.set_epoch(epoch)` before each epoch

    def set_epoch(self, epoch: int) -> None:
        for sampler in self.samplers:
            sampler.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.samplers[0]) if self.samplers else 0  # none once every member is pruned

    def __iter__(self) -> Iterator[Tensor]:
        for rows in zip(*self.samplers):
            yield torch.stack(rows).long()


class StackedRegression(L.LightningModule):
    """The members' models as one: their parameters stacked, the model's forward and loss vmapped over them."""

    def __init__(
        self, models: Sequence[RegressionModule], x: Tensor, y: Tensor, batches: StackedBatches, report: Report | None
    ) -> None:
        super().__init__()
        self.automatic_optimization = False
        params, _ = stack_module_state(list(models))  # neither model has buffers
        self.names, self.stacked = list(params), nn.ParameterList(params.values())
        self.register_buffer("x", x)  # (members, n, features): each member's own data set
        self.register_buffer("y", y)
        self.register_buffer("lr", torch.tensor([float(m.hparams.lr) for m in models]))
        model = models[0]  # runs with each member's parameters in turn (kept out of this module's parameters)
        self.batch_loss = vmap(lambda p, x, y: model.loss(functional_call(model, p, (x,)), y))
        self.full_mse = vmap(lambda p, x, y: squared_loss(functional_call(model, p, (x,)), y))  # validation_step's
        self.every = log_interval(model.hparams.log_every_sgd_steps, x.shape[1], batches.batch_size)
        # In the order a single run logs them within a step (a member's logs are written step by step in this order).
        self.curves: dict[str, list[tuple[int, int, Tensor]]] = {"params": [], "train/mse": [], "train/loss": []}
        self.diverged: list[int | None] = [None] * len(models)
        self.pruned: list[int | None] = [None] * len(models)  # the epoch (from 1) after which its pruner stopped it
        self.at = list(range(len(models)))  # stacked position -> member: pruned members leave the stack
        self.batches, self.report = batches, report
        self.logged_at = -1  # the step params were last noted at

    def params(self) -> dict[str, Tensor]:
        """The stacked parameters by the single model's names (`w`, or `linear.weight` and `linear.bias`)."""
        return dict(zip(self.names, self.stacked))

    def configure_optimizers(self) -> HandSGD:
        # The tutorial's sgd, `p.data -= lr * p.grad`, each member's lr broadcast over its rows of p.
        groups = [{"params": [p], "lr": self.lr.view(-1, *[1] * (p.dim() - 1))} for p in self.stacked]
        return HandSGD(groups, lr=self.lr)

    def training_step(self, batch: Tensor, batch_idx: int) -> None:
        opt, params, size = self.optimizers(), self.params(), self.batches.batch_size
        xs, ys = gather(self.x, batch).split(size, 1), gather(self.y, batch).split(size, 1)  # as BatchLoader does
        for step, (x, y) in enumerate(zip(xs, ys), start=self.trainer.global_step):
            loss = self.batch_loss(params, x, y)
            # The sum's gradient is each member's own loss's; stepped through Lightning, which counts global_step.
            if self.lean_steps:
                fastpath.lean_backward_and_step(loss.sum(), opt, opt.optimizer.update)
            else:
                self.manual_backward(loss.sum())
                opt.step()
            if step % self.every == 0:
                self.note("train/loss", step, loss)

    def weights(self) -> Tensor:
        """(members, coefficients): each row its model's `weights()` (parameters in order, flattened)."""
        return torch.cat([p.detach().flatten(1) for p in self.stacked], 1)

    def mse(self) -> Tensor:
        """Each member's MSE on its whole data set now."""
        with torch.no_grad():
            return self.full_mse(self.params(), self.x, self.y)

    def note(self, tag: str, step: int, values: Tensor) -> None:
        """Keep what a single run would log now, for every member."""
        values = values.detach().reshape(len(self.at), -1).cpu()
        every = values.new_full((len(self.diverged), values.shape[1]), math.nan)  # a member that left: NaN
        every[self.at] = values
        self.curves[tag].append((self.current_epoch, step, every))

    def note_params(self) -> None:
        """`params/*` at this step, once per step, as the Dashboard logs them."""
        if self.trainer.global_step != self.logged_at:
            self.logged_at = self.trainer.global_step
            self.note("params", self.logged_at, self.weights())

    def on_train_start(self) -> None:
        self.lean_steps = fastpath.lean_steps(self.trainer)
        self.note_params()

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.trainer.global_step // self.every > self.logged_at // self.every:  # the Dashboard's cadence
            self.note_params()

    def on_train_epoch_end(self) -> None:
        mse = self.mse()  # a single run's end-of-epoch validation
        self.note("train/mse", self.trainer.global_step, mse)
        self.note_params()
        finite = torch.isfinite(mse) & torch.isfinite(self.weights()).all(1)
        for i in torch.nonzero(~finite).flatten().tolist():
            if self.diverged[self.at[i]] is None:
                self.diverged[self.at[i]] = self.current_epoch  # its single run stops here
        if self.report is not None:  # as a single run's ReportToStudy: a finite train/mse, not a diverged member's
            epoch = self.current_epoch + 1
            for j, value in zip(self.at, mse.tolist()):
                if self.diverged[j] in (None, epoch - 1) and math.isfinite(value) and self.report(j, epoch, value):
                    self.pruned[j] = epoch
            self.leave([i for i, j in enumerate(self.at) if self.pruned[j] is not None])
        if all(d is not None or p is not None for d, p in zip(self.diverged, self.pruned)):
            self.trainer.should_stop = True

    def leave(self, gone: list[int]) -> None:
        """The members at these stacked positions leave: their rows of the parameters, data and lr, their samplers."""
        if not gone:
            return
        keep = [i for i in range(len(self.at)) if i not in gone]
        for p, group in zip(self.stacked, self.trainer.optimizers[0].param_groups):  # a group a stacked parameter
            p.data, p.grad, group["lr"] = p.data[keep], None, group["lr"][keep]  # the optimizer holds the same p
        self.x, self.y, self.lr = self.x[keep], self.y[keep], self.lr[keep]
        self.at = [self.at[i] for i in keep]
        self.batches.samplers = [self.batches.samplers[i] for i in keep]

    def members_curves(self) -> list[Curves]:
        """Each member's curves up to the end of the epoch it stopped in."""
        # Views of one tensor a tag: rows as lists, all alive at once, would set off full garbage collections.
        tables = {tag: ([e for e, _, _ in rows], [s for _, s, _ in rows], torch.stack([v for *_, v in rows], 1))
                  for tag, rows in self.curves.items()}  # fmt: skip
        curves = []
        for j, (diverged, pruned) in enumerate(zip(self.diverged, self.pruned)):
            last = next(e for e in (diverged, pruned and pruned - 1, math.inf) if e is not None)
            ends = {tag: bisect.bisect_right(epochs, last) for tag, (epochs, _, _) in tables.items()}  # noted in order
            curves.append({tag: (steps[: ends[tag]], v[j, : ends[tag]]) for tag, (_, steps, v) in tables.items()})
        return curves


def gather(data: Tensor, rows: Tensor) -> Tensor:
    """Each member's rows of its own data, (members, rows, features): one `index_select` of the members' data."""
    members, n = data.shape[:2]
    flat = rows + torch.arange(members, device=rows.device).view(-1, 1) * n  # row i of member j: j * n + i
    return data.reshape(members * n, -1).index_select(0, flat.reshape(-1)).view(members, rows.shape[1], -1)


@dataclass
class Member:
    """One trained member: its run record and what its single run's loggers would have written."""

    cfg: Config
    record: RunRecord
    hparams: dict[str, Any]  # Lightning's hparams of its single run: the model's and the DataModule's arguments
    curves: Curves

    def write(self, out: Path, label: str) -> None:
        """Its single run's logger runs (train/*, params/*, HParams; no graph or fit image), then metrics.json."""
        r = self.record
        with fastpath.events_written_here():  # written whole, here
            loggers = build_loggers(r.config.get("logger"), out, label)  # its config resolved (the record's): plain
        tb = next((lg for lg in loggers if isinstance(lg, TensorBoardLogger)), None)
        for lg in loggers:
            lg.log_hyperparams(self.hparams)
        if tb is not None:  # as the Dashboard writes them
            end = start_hparams(tb, hparams(r))  # of its config: the same as its single run's at its start
            saved = Path(tb.log_dir) / tb.NAME_HPARAMS_FILE  # what Lightning's `save` writes unless it is there
            if not os.path.lexists(saved):  # a link is not followed, and is left as Lightning leaves it
                with contextlib.suppress(Exception):  # what OmegaConf cannot hold: Lightning's `save` writes it
                    write_atomic(saved, fastpath.to_yaml(dict(tb.hparams)).encode())
        params = [f"params/{n}" for n in param_names(len(r.weights), bool(self.cfg["data"]["bias"]))]
        rows = [
            (s, dict(zip(params if tag == "params" else [tag], v)))
            for tag, (steps, values) in self.curves.items()
            for s, v in zip(steps, values.tolist())
        ]
        rows.sort(key=lambda row: row[0])  # by step (stable): its single run's order, a step's scalars in one event
        rows.append((r.steps, hp_metrics(self.curves["train/mse"][1][-1, 0].item(), r.ols_mse)))  # once, at the end
        for lg in loggers:
            for step, metrics in rows:
                lg.log_metrics(metrics, step=step)
            if lg is tb:
                tb.experiment.file_writer.add_summary(end)
            lg.finalize("success")
        r.write(out)


def train_group(cfgs: Sequence[Config], report: Report | None = None) -> list[Member | ConfigError]:
    """Train the jobs as one stacked model in one `Trainer.fit` (`report`: to job j's pruner): a Member each, or why."""
    with torch_threads(cfgs[0]["threads"]):  # the same reductions whichever launcher runs a job
        built, failed, cls = [], {}, model_class(cfgs[0]["model"]["_target_"])  # one class: the group's key holds it
        for j, cfg in enumerate(cfgs):
            try:
                dm = build_datamodule(cfg)
                model = build_model(cfg, dm, cls)
            except ConfigError as err:
                failed[j] = err
                continue
            logged = {**model.hparams_initial, **dm.hparams_initial}  # the hparams Lightning logs for its single run
            built.append((cfg, model, *dm.full_data(), dm.ols_mse(), dm.train_dataloader().sampler, logged, j))
        members = iter(fit(built, report) if built else [])
        return [failed[j] if j in failed else next(members) for j in range(len(cfgs))]


def fit(built: list[tuple[Any, ...]], report: Report | None) -> list[Member]:
    """One `Trainer.fit` of the members' stacked model; the members' records and curves."""
    cfgs, models, xs, ys, ols, samplers, logged, jobs = zip(*built)
    built.clear()  # once stacked (and xs, ys deleted), the members' data is held only by the module
    batches = StackedBatches(samplers, cfgs[0]["data"]["batch_size"])
    to_job = None if report is None else lambda i, epoch, mse: report(jobs[i], epoch, mse)
    module = StackedRegression(models, torch.stack(xs), torch.stack(ys), batches, to_job)
    del xs, ys
    trainer = build_trainer(cfgs[0], None, callbacks=[], loggers=[], bar=False)
    start = time.perf_counter()
    trainer.fit(module, train_dataloaders=batches)
    seconds = (time.perf_counter() - start) / len(cfgs)  # each member's share of the group's fit
    members = []
    for j, (cfg, curves) in enumerate(zip(cfgs, module.members_curves())):
        diverged, pruned = module.diverged[j], module.pruned[j]
        (mse_steps, mse), (_, params) = curves["train/mse"], curves["params"]
        epoch_mse = mse.flatten().tolist()
        record = RunRecord.of(
            cfg,
            "diverged" if diverged is not None else "pruned" if pruned else "ok",
            epoch_mse=epoch_mse,
            train_mse=epoch_mse[-1],
            weights=params[-1].tolist(),
            ols_mse=ols[j],
            steps=mse_steps[-1],
            fit_seconds=seconds,
            diverged_epoch=diverged,
            pruned_epoch=pruned,
        )
        members.append(Member(cfg, record, logged[j], curves))
    return members
