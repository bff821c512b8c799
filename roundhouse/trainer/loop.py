"""The one training loop. It calls a `Strategy` and never asks which one it has.

Per optimizer step: this rank's micro-batches go through `strategy.forward_backward` (the last
with `sync=True`), then `strategy.optimizer_step`. Each micro-batch's `loss_scale` is its share
of the global batch: of its samples, or, for a task that declares `loss_items`, of the whole
global batch's items (counted with one `strategy.sum_over_replicas` per step). Around that:
logging every `trainer.log_every_steps`, validation every `trainer.eval_every_steps` and at
each epoch end, checkpoints, early stopping, and a final test evaluation.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, TypeVar

from roundhouse.config import JobSpec
from roundhouse.config.topology import compute_total_steps
from roundhouse.data import Splits, StepLoader
from roundhouse.errors import CheckpointError, TrainingError
from roundhouse.parallel.base import StepStats, Strategy, move_to
from roundhouse.parallel.context import WorkerContext
from roundhouse.runs.tracking import Tracker
from roundhouse.trainer.async_checkpoint import build_saver
from roundhouse.trainer.live_recovery import JoinPending, LiveRecovery
from roundhouse.trainer.losses import StepWeights, step_weights
from roundhouse.trainer.preemption import PreemptionGuard
from roundhouse.trainer.sample_ledger import StepLedger
from roundhouse.trainer.task import Task
from roundhouse.weights.checkpoint import Checkpointer, get_rng_state, set_rng_state
from roundhouse.weights.lora import AdapterCheckpoint

logger = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass
class TrainState:
    """Loop counters saved in every checkpoint."""

    step: int = 0
    epoch: int = 0  # the epoch the data loader is in (the next one, after an epoch ends)
    step_epoch: int = 0  # the epoch the last optimizer step belonged to: the `epoch` logged
    last_eval_step: int = -1
    best_metric: float | None = None
    evals_without_improvement: int = 0
    skipped_steps: int = 0


@dataclass
class Window:
    """Running train metrics between two log lines."""

    loss_sum: float = 0.0
    steps: int = 0
    samples: int = 0
    started: float = 0.0
    turn_loss: dict[str, float] = field(default_factory=dict)  # per optimizer, when several

    def reset(self) -> None:
        """Start a new logging window now."""
        self.loss_sum, self.steps, self.samples, self.started = 0.0, 0, 0, time.perf_counter()
        self.turn_loss = {}


class Trainer:
    """Runs `fit()` for one worker. Built by `run_worker`; everything is injected."""

    def __init__(
        self,
        job: JobSpec,
        ctx: WorkerContext,
        *,
        strategy: Strategy,
        task: Task,
        splits: Splits,
        tracker: Tracker,
        checkpointer: Checkpointer,
        train_loader: StepLoader,
        adapters: AdapterCheckpoint | None = None,
        ledger: StepLedger | None = None,
        recovery: LiveRecovery | None = None,
    ) -> None:
        self.job, self.ctx, self.strategy, self.task = job, ctx, strategy, task
        self.splits, self.tracker, self.checkpointer = splits, tracker, checkpointer
        self.cfg = job.trainer
        self.state = TrainState()
        self.train_loader = train_loader
        self.adapters = adapters  # LoRA: checkpoints hold the adapters, not the frozen base
        self.total_steps = compute_total_steps(job, len(self.train_loader))
        self.window = Window()
        self.last_checkpoint_step: int | None = None
        self.last_val_metrics: dict[str, float] = {}
        self.ledger = ledger  # trainer.ledger: what this rank trained, step by step
        # trainer.checkpoint.async: the loop waits only for a CPU snapshot of the state
        self.saver = build_saver(checkpointer, job.trainer.checkpoint.async_)
        self.preempt = PreemptionGuard(job.cluster.preempt_grace_s)  # SIGTERM: save and stop
        self.recovery = recovery  # cluster.recovery: live (None: a lost peer ends the run)
        self.phases = strategy.phases()  # one per optimizer, in the task's order
        # Loss items (`Task.loss_items`) of this rank's share of the last step; live recovery
        # sets `held_items` to those of a failed step's share whose gradients it kept.
        self.step_items, self.held_items = 0.0, 0.0

    # --- checkpoints ------------------------------------------------------------------------

    def save_checkpoint(self) -> None:
        """Write a checkpoint of the current step (strategy, loop state, data position, RNGs)."""
        state = {
            "strategy": self.strategy.state_dict(),
            "trainer": asdict(self.state),
            # The loader's whole position (a streamed dataset adds samples_done, which lets a
            # run resume at another world size or batch size).
            "data": {**self.train_loader.state_dict(), "epoch": self.state.epoch},
            "rng": get_rng_state(),
        }
        if self.adapters is not None:
            state = self.adapters.pack(state)
        if self.strategy.is_main_process:
            self.saver.save(self.state.step, state, {"epoch": self.state.epoch})
            self.tracker.flush()
        self.last_checkpoint_step = self.state.step

    def restore(self, step: int | None) -> None:
        """Resume from checkpoint `step` (None: latest) of this run."""
        state = self.checkpointer.load(step)
        if self.adapters is not None:
            state = self.adapters.unpack(state)
        try:
            self.strategy.load_state_dict(state["strategy"])
        except (RuntimeError, KeyError, ValueError) as exc:
            raise CheckpointError(
                f"checkpoint does not fit this job's model: {str(exc).splitlines()[0]}",
                "resume with the job file that wrote it, or start a new run without --resume",
            ) from exc
        self.state = TrainState(**state["trainer"])
        self.train_loader.load_state_dict(state["data"])
        set_rng_state(state["rng"])
        self.last_checkpoint_step = self.state.step
        if self.ledger is not None:
            self.ledger.resumed(self.state.step)
        logger.info("resumed at step %d, epoch %d", self.state.step, self.state.epoch)

    # --- the loop ---------------------------------------------------------------------------

    def fit(self) -> dict[str, float]:
        """Train until max_steps/max_epochs or early stopping; return the final metrics."""
        self.window.reset()
        stop = self.state.step >= self.total_steps
        self.preempt.install()
        try:
            while not stop and self.state.epoch < self.max_epochs:
                stop = self.guarded(self.run_epoch)
            return self.guarded(self.finish)
        finally:
            self.preempt.uninstall()

    def guarded(self, fn: Callable[[], T]) -> T:
        """`fn()`, redone after live recovery when a peer is lost (`cluster.recovery: live`)."""
        return fn() if self.recovery is None else self.recovery.guard(self, fn)

    @property
    def max_epochs(self) -> int:
        """`trainer.max_epochs`, or infinity when only `max_steps` bounds the run."""
        return self.cfg.max_epochs if self.cfg.max_epochs is not None else math.inf  # type: ignore[return-value]

    def run_epoch(self) -> bool:
        """One pass over this rank's share of the training data; True means stop training."""
        self.strategy.train_mode(True)
        self.task.set_epoch(self.state.epoch)
        stop = False
        for micro_batches in self.train_loader:
            self.train_step(micro_batches)
            if self.after_step():
                stop = True
                break
        if self.train_loader.state_dict()["steps_done"] < len(self.train_loader):
            return stop  # stopped mid-epoch
        return self.end_epoch() or stop

    def end_epoch(self) -> bool:
        """Validate, move the data position to the next epoch, checkpoint; True means stop."""
        # A step already validated by eval_every_steps was already counted for early stopping.
        stop = False
        if self.state.last_eval_step != self.state.step:
            stop = self.validate_and_check_early_stop()
        self.state.epoch += 1
        self.train_loader.load_state_dict({"epoch": self.state.epoch, "steps_done": 0})
        if self.cfg.checkpoint.every_epoch:
            self.save_checkpoint()
        return stop

    def train_step(self, micro_batches: list[dict]) -> None:
        """One optimizer step over this rank's micro-batches (skipped when a loss is non-finite).

        A task with several optimizers steps each in turn (`Strategy.phases`, in its order):
        each turn runs the micro-batches and steps that optimizer before the next begins.
        """
        if self.recovery is not None:
            self.recovery.begin_step(self)
        step_size = self.train_loader.last_step_size
        weights = self.step_weights(micro_batches, step_size)
        need_norm = (self.state.step + 1) % self.cfg.log_every_steps == 0
        turns: list[tuple[str, float, StepStats]] = []
        for phase in self.phases:
            with phase.active():
                turn = self.run_turn(phase.strategy, micro_batches, weights, need_norm)
            if turn is None:
                return
            turns.append((phase.name, *turn))
        self.state.step += 1
        self.state.step_epoch = self.state.epoch
        if self.ledger is not None:
            self.ledger.committed(
                epoch=self.state.epoch,
                global_step=self.state.step,
                world=self.strategy.data_parallel_size,
            )
        self.window.loss_sum += sum(loss for _, loss, _ in turns)
        self.window.steps += 1
        self.window.samples += step_size
        if len(turns) > 1:
            for name, loss, _ in turns:
                self.window.turn_loss[name] = self.window.turn_loss.get(name, 0.0) + loss
        if need_norm:
            self.log_train(turns[0][2] if len(turns) == 1 else merge_turn_stats(turns))

    def step_weights(self, micro_batches: list[dict], step_size: int) -> StepWeights:
        """Each micro-batch's `loss_scale` and weight in the reported loss: by its samples, or,
        when the task declares `loss_items`, by its items against the whole global batch's
        count (one scalar all-reduce; none where the task declares none)."""
        dp = self.strategy.data_parallel_size
        samples = [int(batch["target"].shape[0]) for batch in micro_batches]
        items = [self.task.loss_items(batch) for batch in micro_batches]
        if any(k is None for k in items):
            return step_weights(samples, None, step_size, dp, None)
        counts = [int(k) for k in items if k is not None]
        self.step_items, self.held_items = float(sum(counts)) + self.held_items, 0.0
        total = self.strategy.sum_over_replicas(self.step_items)
        return step_weights(samples, counts, step_size, dp, total)

    def run_turn(
        self, strategy: Strategy, micro_batches: list[dict], weights: StepWeights, need_norm: bool
    ) -> tuple[float, StepStats] | None:
        """Forward/backward every micro-batch and step `strategy`'s optimizer: the mean loss
        (per sample, or per loss item) and the step's stats, or None when the loss was
        non-finite (the step skipped)."""
        losses: list[tuple[Any, float]] = []
        for i, batch in enumerate(micro_batches):
            loss = strategy.forward_backward(
                batch, loss_scale=weights.scales[i], sync=i == len(micro_batches) - 1
            )
            losses.append((loss, weights.counts[i]))
        # Read back only now: on a GPU, reading a loss waits for its kernels, and reading each
        # micro-batch's at once would leave the device idle while the next one is launched.
        loss_sum = sum(float(loss) * n for loss, n in losses)
        counted = sum(n for _, n in losses)
        hold = self.recovery is not None and self.recovery.join_waiting()
        if not self.preempt.agree(strategy.all_true, math.isfinite(loss_sum), hold):
            self.on_nonfinite_loss(loss_sum, strategy)
            return None
        stats = strategy.optimizer_step(need_grad_norm=need_norm)
        return loss_sum / max(counted, 1), stats

    def on_nonfinite_loss(self, loss_sum: float, strategy: Strategy | None = None) -> None:
        """Skip the step, or raise `TrainingError` unless `trainer.skip_nonfinite_steps`."""
        step = self.state.step + 1
        if not self.cfg.skip_nonfinite_steps:
            kept = self.last_checkpoint_step
            where = (
                f"step_{kept} is the last good checkpoint"
                if kept is not None
                else "no checkpoint yet"
            )
            raise TrainingError(
                f"loss is {loss_sum} at step {step} ({where})",
                "lower trainer.optimizer.lr, set trainer.grad_clip_norm, "
                "or set trainer.skip_nonfinite_steps=true",
            )
        logger.warning("skipping step %d: loss is %s", step, loss_sum)
        (strategy or self.strategy).zero_grad()
        self.state.skipped_steps += 1

    def after_step(self) -> bool:
        """Periodic work after an optimizer step; True means stop training."""
        step = self.state.step
        if self.preempt.stop:
            self.stop_preempted()
        if self.cfg.eval_every_steps and step % self.cfg.eval_every_steps == 0:
            if self.validate_and_check_early_stop():
                return True
            self.strategy.train_mode(True)
        every = self.cfg.checkpoint.every_steps
        if every and step % every == 0 and step != self.last_checkpoint_step:
            self.save_checkpoint()
        # trainer.max_epochs ends the run at an epoch end (in `fit`): with dynamic data
        # assignment a rank's own step count says nothing about the epoch.
        done = self.cfg.max_steps is not None and step >= self.cfg.max_steps
        if self.preempt.pause and self.recovery is not None and not done:
            self.preempt.pause = False
            raise JoinPending  # `guard` admits the waiting replacements, then goes on
        return done

    def stop_preempted(self) -> None:
        """SIGTERM reached some rank: a complete checkpoint of this step, then `Preempted`."""
        if self.last_checkpoint_step != self.state.step:
            self.save_checkpoint()
        self.saver.wait()
        self.tracker.flush()
        url = self.checkpointer.url_of(self.state.step)
        raise self.preempt.preempted(self.state.step, url)

    # --- metrics ----------------------------------------------------------------------------

    def log_train(self, stats: StepStats) -> None:
        """Log the window's train metrics (loss, lr, grad norm, throughput) and start a new one."""
        elapsed = max(time.perf_counter() - self.window.started, 1e-9)
        metrics = {
            "train/loss": self.window.loss_sum / max(self.window.steps, 1),
            "train/lr": stats.lr,
            "train/samples_per_s": self.window.samples / elapsed,
        }
        if stats.grad_norm is not None:
            metrics["train/grad_norm"] = stats.grad_norm
        for name, total in self.window.turn_loss.items():
            metrics[f"train/loss_{name}"] = total / max(self.window.steps, 1)
        metrics.update(stats.extra)  # strategy metrics, e.g. train/ps_staleness_max
        metrics.update(self.splits.metrics())  # e.g. data/corrupt_shards_skipped
        self.tracker.log(metrics, step=self.state.step, epoch=self.state.step_epoch)
        self.tracker.update_progress(
            step=self.state.step,
            epoch=self.state.step_epoch,
            loss=metrics["train/loss"],
            samples_per_s=metrics["train/samples_per_s"],
        )
        self.window.reset()

    def evaluate(self, split: str) -> dict[str, float]:
        """Loss and accuracy on `split` (val or test), summed over all ranks."""
        loader = self.splits.eval_loader(
            split,
            batch_size=self.job.data.eval_batch_size,
            rank=self.strategy.data_parallel_rank,
            world_size=self.strategy.data_parallel_size,
        )
        self.strategy.train_mode(False)
        self.task.set_epoch(None)
        sums: dict[str, Any] = {}
        try:
            for batch in loader:
                batch = move_to(batch, self.ctx.device)  # the task's sums read the targets too
                outputs = self.strategy.forward(batch)
                for key, value in self.task.eval_sums(outputs, batch).items():
                    sums[key] = sums.get(key, 0) + value.detach().cpu()
        finally:
            self.task.set_epoch(self.state.epoch)
        totals = self.strategy.reduce_metrics(sums)
        return {f"{split}/{k}": v for k, v in self.task.finalize(totals).items()}

    def validate_and_check_early_stop(self) -> bool:
        """Evaluate on val, log it, and return whether early stopping says stop."""
        metrics = self.last_val_metrics = self.evaluate("val")
        self.state.last_eval_step = self.state.step
        self.tracker.log(metrics, step=self.state.step, epoch=self.state.step_epoch)
        return self.update_early_stopping(metrics)

    def update_early_stopping(self, metrics: dict[str, float]) -> bool:
        """Track the watched metric; True when it has not improved for `patience` evaluations."""
        rule = self.cfg.early_stopping
        if rule is None:
            return False
        metric, mode = selection_metric(self.task, rule.metric, rule.mode)
        if metric not in metrics:
            raise TrainingError(
                f"trainer.early_stopping.metric={metric!r} is not a validation metric",
                f"valid: {', '.join(sorted(metrics))}",
            )
        value, best = metrics[metric], self.state.best_metric
        sign = 1.0 if mode == "min" else -1.0
        if best is None or sign * (best - value) > rule.min_delta:
            self.state.best_metric, self.state.evals_without_improvement = value, 0
            return False
        self.state.evals_without_improvement += 1
        if self.state.evals_without_improvement >= rule.patience:
            logger.info("early stopping at step %d: %s did not improve", self.state.step, metric)
            return True
        return False

    def finish(self) -> dict[str, float]:
        """Final validation (unless this step was just validated), test, checkpoint, summary."""
        logged: dict[str, float] = {}
        if self.state.last_eval_step != self.state.step or not self.last_val_metrics:
            logged = self.last_val_metrics = self.evaluate("val")
        test = self.evaluate("test")
        self.tracker.log({**logged, **test}, step=self.state.step, epoch=self.state.step_epoch)
        if self.last_checkpoint_step != self.state.step:
            self.save_checkpoint()
        summary = {
            **self.last_val_metrics,
            **test,
            "train/steps": float(self.state.step),
            "train/skipped_steps": float(self.state.skipped_steps),
        }
        self.tracker.summary(summary)
        return summary


def build_train_loader(job: JobSpec, splits: Splits, strategy: Strategy) -> StepLoader:
    """This rank's training loader over the job's `Topology` (its batch arithmetic)."""
    data = job.data
    topology = strategy.topology  # the worker's one layout; the strategy gives the rank order
    if data.train is not None:  # streamed: the rank reads its own partition from storage
        return splits.train_loader(
            global_batch_size=topology.global_batch,
            rank=strategy.data_parallel_rank,
            world_size=topology.data_parallel,
            grad_accum_steps=topology.grad_accum_steps,
            num_workers=data.num_workers,
            augment=data.augment,
        )
    return StepLoader.of_topology(
        splits.train,
        topology,
        rank=strategy.data_parallel_rank,
        seed=job.trainer.seed,
        shuffle=data.shuffle,
        num_workers=data.num_workers,
        augment=data.augment,
        mixup_alpha=data.augment.mixup_alpha,
        claim=strategy.data_claimer(),
        virtual_shards=strategy.virtual_shards(),
    )


def merge_turn_stats(turns: list[tuple[str, float, StepStats]]) -> StepStats:
    """One step's stats from each optimizer's turn: the first's lr, the total gradient norm,
    and each turn's lr and norm as `train/lr_<name>` and `train/grad_norm_<name>`."""
    extra: dict[str, float] = {}
    norms = []
    for name, _, stats in turns:
        extra[f"train/lr_{name}"] = stats.lr
        if stats.grad_norm is not None:
            extra[f"train/grad_norm_{name}"] = stats.grad_norm
            norms.append(stats.grad_norm)
        extra.update(stats.extra)
    grad_norm = math.sqrt(sum(n * n for n in norms)) if norms else None
    return StepStats(grad_norm=grad_norm, lr=turns[0][2].lr, extra=extra)


def selection_metric(task: Task, metric: str | None, mode: str | None) -> tuple[str, str]:
    """The metric early stopping watches and its direction: the job's, else the task's own
    (`Task.metric`, `Task.metric_mode`)."""
    own = f"val/{task.metric}"
    metric = metric or own
    if mode is None:
        mode = getattr(task, "metric_mode", "min") if metric == own else "min"
    return metric, mode
