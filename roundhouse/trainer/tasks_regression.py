"""Regression: float value targets, losses `mse`/`l1`/`huber`, metrics MSE, MAE and R².

A data set whose targets are float values (`DataInfo.target_shape` set: `builtin:diabetes`, or
a `data prepare`d table with a float target column) trains the regression task. The model's
`num_classes` outputs are the target's values: `(B, D)` outputs against `(B, D)` targets, or
`(B, 1)` against `(B,)` for one value. Class labels keep the classification task; float labels
given to a classification loss are a one-line error before anything is written.

R² = 1 - SSE / SST per output, averaged over the outputs (scikit-learn's `r2_score` default).
Every term is a sum that adds over batches and ranks: per output, the count, Σ(y - ŷ)², Σ|y - ŷ|,
Σy and Σy², so SST = Σy² - (Σy)²/n is exact on the whole split, not a mean of per-rank R²s.
"""

from __future__ import annotations

from torch import Tensor, nn

from roundhouse import models
from roundhouse.config import JobSpec, LossConfig
from roundhouse.data import DataInfo
from roundhouse.data.sources import VALUE_TARGET_SOURCES
from roundhouse.errors import DataError, JobFileError
from roundhouse.trainer.losses import LossFn, build_loss
from roundhouse.trainer.task_api import Task

REGRESSION_LOSSES = ("mse", "l1", "huber")
REGRESSION = "regression"


def as_values(outputs: Tensor, target: Tensor) -> Tensor:
    """The model's outputs `(B, D)` shaped like the targets (`(B,)` for one value), in float32."""
    return outputs.float().reshape(target.shape)


class RegressionTask(Task):
    """Float outputs against float targets; metrics: loss, MSE, MAE and R²."""

    export_kind = "regressor"

    def __init__(self, loss_fn: LossFn) -> None:
        self.loss_fn = loss_fn

    def metric_names(self) -> tuple[str, ...]:
        """The metrics `finalize` returns."""
        return ("loss", "mse", "mae", "r2")

    def forward(self, model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
        """The model's outputs `(B, D)` for the batch's inputs."""
        return model(batch["input"])

    def loss(self, outputs: Tensor, batch: dict[str, Tensor]) -> Tensor:
        """The job's regression loss (a mean over samples and values)."""
        target = batch["target"].float()
        return self.loss_fn(as_values(outputs, target), target)

    def eval_sums(self, outputs: Tensor, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """Per-output count, squared and absolute errors, Σy, Σy² and the summed loss."""
        target = batch["target"].float()
        pred = as_values(outputs, target).detach()
        columns = target.reshape(target.shape[0], -1)  # (B, D)
        errors = (pred.reshape(columns.shape) - columns).double()
        count = float(columns.shape[0])
        sums = {"loss": self.loss(outputs, batch).detach().double() * count}
        sums["count"] = errors.new_tensor(count)
        for d in range(columns.shape[1]):
            y = columns[:, d].double()
            sums[f"sse_{d}"] = errors[:, d].square().sum()
            sums[f"sae_{d}"] = errors[:, d].abs().sum()
            sums[f"sy_{d}"] = y.sum()
            sums[f"syy_{d}"] = y.square().sum()
        return sums

    def finalize(self, sums: dict[str, float]) -> dict[str, float]:
        """Mean loss, MSE, MAE and R² (averaged over outputs) from the sums of every rank."""
        n = max(sums["count"], 1.0)
        outputs = sorted(int(k.split("_")[1]) for k in sums if k.startswith("sse_"))
        mse = [sums[f"sse_{d}"] / n for d in outputs]
        mae = [sums[f"sae_{d}"] / n for d in outputs]
        r2 = [r_squared(sums, d, n) for d in outputs]
        width = max(len(outputs), 1)
        return {
            "loss": sums["loss"] / n,
            "mse": sum(mse) / width,
            "mae": sum(mae) / width,
            "r2": sum(r2) / width,
        }


def r_squared(sums: dict[str, float], d: int, n: float) -> float:
    """1 - SSE/SST of output `d`; 0 for a constant target (nothing to explain)."""
    sst = sums[f"syy_{d}"] - sums[f"sy_{d}"] ** 2 / n
    return 1.0 - sums[f"sse_{d}"] / sst if sst > 0 else 0.0


def build_regression_task(loss: LossConfig) -> RegressionTask:
    """The regression task with the job's loss, which must be `mse`, `l1` or `huber`.

    Raises:
        JobFileError: a classification loss (`cross_entropy`, `focal`) for value targets.
    """
    if loss.name not in REGRESSION_LOSSES:
        raise JobFileError(
            f"trainer.loss.name={loss.name!r} is a classification loss, but the data's targets "
            "are float values (regression)",
            f"set trainer.loss.name to one of {', '.join(REGRESSION_LOSSES)}",
        )
    return RegressionTask(build_loss(loss))


def resolve_task_kind(kind: str, info: DataInfo, loss: LossConfig, source: str) -> str:
    """The task for a model whose `ModelSpec.loss` is `kind`, on data described by `info`.

    Value targets turn a classifier into a regressor (its `num_classes` outputs are the values)
    when the loss is a regression loss; anything else given float labels is an error.

    Raises:
        DataError: float labels given to a classification task (a classification loss, or a
            model whose task cannot take values).
    """
    if not info.has_values:
        return kind
    if kind in ("classification", REGRESSION) and loss.name in REGRESSION_LOSSES:
        return REGRESSION
    what = f"trainer.loss.name={loss.name}" if kind == "classification" else f"task {kind}"
    raise DataError(
        f"data {source} has float value targets (regression), given to a classification "
        f"task ({what})",
        f"set trainer.loss.name to {', '.join(REGRESSION_LOSSES)} with a classifier model, or "
        "use integer class labels",
    )


def resolve_job_task(job: JobSpec, info: DataInfo) -> str:
    """`resolve_task_kind` for the job's model, loss and data."""
    source = job.data.source or (job.data.train.url if job.data.train else "the data")
    return resolve_task_kind(models.get(job.model.name).loss, info, job.trainer.loss, source)


def job_task_kind(job: JobSpec) -> str:
    """The task a job trains (regression for value targets), opening the data only when a
    classifier with a regression loss might meet value targets."""
    kind = models.get(job.model.name).loss
    if kind != "classification" or job.trainer.loss.name not in REGRESSION_LOSSES:
        return kind
    if job.data.source is not None and job.data.source not in VALUE_TARGET_SOURCES:
        return kind
    from roundhouse.data import build_splits

    return resolve_job_task(job, build_splits(job.data, seed=job.trainer.seed).info)


def check_job_targets(job: JobSpec) -> None:
    """Pre-flight: value targets need a regression loss and a model that can regress.

    Only sources that can hold values are opened: the built-in regression sets and prepared
    (streamed) data sets, whose `index.json` says what their targets are.

    Raises:
        DataError: float labels given to a classification task.
    """
    if job.data.source is not None and job.data.source not in VALUE_TARGET_SOURCES:
        return
    from roundhouse.data import build_splits

    try:
        info = build_splits(job.data, seed=job.trainer.seed).info
    except DataError:
        return  # unreadable data: the data's own check reports it where it always did
    resolve_job_task(job, info)
