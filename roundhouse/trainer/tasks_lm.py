"""Language-model tasks: next-token prediction (`language_model`) and BERT's `masked_lm`.

Batches are `{"input": (B, T) int64, "target": (B, T) int64}` token ids (see
`roundhouse.data.text`); models map `(B, T)` ids to `(B, T, V)` logits.

Extra training losses (MoE). A module that wants a term added to the training loss stores it
as `self.aux_loss` (a scalar tensor) during its forward; it may also store `self.expert_counts`
(`(E,)` tokens routed to each expert) and `self.dropped_tokens`. The task's `forward` collects
these from `model.modules()` right after the model ran (so wrappers such as DDP need nothing),
and `loss` returns the cross-entropy plus the summed auxiliary losses. The evaluation metrics
then include `aux_loss`, `dropped_frac` and `expert<i>_frac` (share of routed tokens), which
the trainer logs as `val/...` like any other metric.

Masking for `masked_lm` is a pure function of the sample's tokens and a seed (a counter-based
hash, no global RNG), so `loss` recomputes exactly the mask `forward` used, evaluation masks are
identical on every run, and a resumed run masks like an uninterrupted one.

Training masks are dynamic by default (RoBERTa's): the training epoch (`Task.set_epoch`) salts
the hash, so a sample is masked afresh each epoch, still the same on every rank and world size
and after a resume. Evaluation keeps one fixed mask per sample, so validation losses compare
across epochs and runs. `task.options.masking: static` keeps the training mask of epoch 0 for
every epoch (the original BERT's pre-generated data).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from roundhouse.data import DataInfo
from roundhouse.data.text import MASK_ID, PAD_ID
from roundhouse.trainer.sampling import LM_OPTIONS, lm_text
from roundhouse.trainer.task_api import ExampleInputs, ExportGraph, SampleRequest, Task, unwrap

logger = logging.getLogger(__name__)

LN2 = math.log(2.0)
EXPORT_SEQ_LEN = 16  # the longest sequence export traces and checks with


def collect_aux(model: nn.Module) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """Sums the `aux_loss`, `expert_counts` and `dropped_tokens` modules set in their forward."""
    aux = counts = dropped = None
    for module in model.modules():
        value = getattr(module, "aux_loss", None)
        if isinstance(value, Tensor):
            aux = value if aux is None else aux + value
            counts = _add(counts, getattr(module, "expert_counts", None))
            dropped = _add(dropped, getattr(module, "dropped_tokens", None))
    return aux, counts, dropped


def _add(total: Tensor | None, value: Tensor | None) -> Tensor | None:
    if value is None:
        return total
    value = value.detach().float()
    return value if total is None else total + value


@dataclass
class _Aux:
    loss: Tensor | None = None
    counts: Tensor | None = None
    dropped: Tensor | None = None


class LanguageModelTask(Task):
    """Next-token cross-entropy over all positions; `PAD` targets are ignored.

    Metrics: `loss` (nats per token), `perplexity` (`exp(loss)`, S3:1841), `bits_per_byte`
    (`loss / ln 2`; a token is a byte, plus one `EOS` per document), `accuracy` (top-1 next
    token), and for MoE models `aux_loss`, `dropped_frac`, `expert<i>_frac`.
    """

    can_sample = True  # `roundhouse sample --prompt`: the prompt and its continuation
    sample_kind = "text"
    sample_options = LM_OPTIONS

    def __init__(self, label_smoothing: float = 0.0) -> None:
        self.label_smoothing = label_smoothing
        self.aux = _Aux()

    def metric_names(self) -> tuple[str, ...]:
        """The metrics `finalize` returns."""
        return ("loss", "perplexity", "bits_per_byte", "accuracy")

    def sample_output(self, model: nn.Module, request: SampleRequest, job: Any) -> str:
        """The prompt and its continuation (temperature, top-k; 0 is greedy)."""
        return lm_text(unwrap(model).eval(), request)

    def forward(self, model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
        """Next-token logits `(B, T, V)`; the model's auxiliary losses are kept for `loss`."""
        logits = model(batch["input"])  # (B, T, V)
        # Read right after the model ran: loss() and eval_sums() are called with these outputs.
        self.aux = _Aux(*collect_aux(model))
        return logits

    def targets(self, batch: dict[str, Tensor]) -> Tensor:
        """`(B, T)` ids to predict; `PAD_ID` marks positions without a loss."""
        return batch["target"]

    def token_losses(self, outputs: Tensor, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """Summed CE over the positions that count, and their number."""
        target = self.targets(batch)
        loss = F.cross_entropy(
            outputs.float().flatten(0, 1),  # (B*T, V)
            target.flatten(),
            ignore_index=PAD_ID,
            reduction="sum",
            label_smoothing=self.label_smoothing,
        )
        return loss, (target != PAD_ID).sum()

    def loss_items(self, batch: dict[str, Tensor]) -> int:
        """The positions that count (targets that are not `PAD`; a masked LM's selected ones):
        `loss`'s cross-entropy is their mean (an MoE auxiliary loss rides along with it)."""
        return int((self.targets(batch) != PAD_ID).sum())

    def loss(self, outputs: Tensor, batch: dict[str, Tensor]) -> Tensor:
        """Token cross entropy (padding ignored) plus the model's auxiliary losses."""
        total, count = self.token_losses(outputs, batch)
        loss = total / count.clamp(min=1)
        return loss if self.aux.loss is None else loss + self.aux.loss

    def eval_sums(self, outputs: Tensor, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """Summed token loss, token count and correct predictions of one evaluation batch."""
        target = self.targets(batch)
        total, count = self.token_losses(outputs, batch)
        valid = target != PAD_ID
        correct = ((outputs.argmax(dim=-1) == target) & valid).sum()
        sums = {"loss": total.detach(), "correct": correct.float(), "count": count.float()}
        return sums | self.aux_sums(outputs.device)

    def aux_sums(self, device: torch.device) -> dict[str, Tensor]:
        """MoE statistics of the last forward, as sums (weighted by batches)."""
        if self.aux.loss is None:
            return {}
        sums = {
            "aux_loss": self.aux.loss.detach().float(),
            "batches": torch.ones((), device=device),
        }
        if self.aux.counts is not None:
            sums |= {f"expert{i}_tokens": c for i, c in enumerate(self.aux.counts)}
            sums["routed_tokens"] = self.aux.counts.sum()
        if self.aux.dropped is not None:
            sums["dropped_tokens"] = self.aux.dropped
        return sums

    def finalize(self, sums: dict[str, float]) -> dict[str, float]:
        """Mean loss, perplexity and accuracy from sums over every rank."""
        n = max(float(sums["count"]), 1.0)
        loss = float(sums["loss"]) / n
        metrics = {
            "loss": loss,
            "perplexity": math.exp(min(loss, 50.0)),
            "bits_per_byte": loss / LN2,
            "accuracy": float(sums["correct"]) / n,
        }
        return metrics | finalize_aux(sums)

    def example_inputs(
        self, input_shape: tuple[int, ...], dtype: torch.dtype, batch_size: int, device: Any
    ) -> ExampleInputs:
        """Token ids `(B, T)`, int64 whatever dtype the caller guessed."""
        shape = (batch_size, *input_shape)
        return ExampleInputs((torch.zeros(shape, dtype=torch.long, device=device),))

    def export_inputs(
        self,
        model: nn.Module,
        info: DataInfo,
        dtype: torch.dtype,
        batch_size: int,
        generator: torch.Generator,
        variant: int = 0,
    ) -> ExampleInputs:
        """Token ids `(B, T)`: T = 16 (at most the data's), 5 shorter per `variant`."""
        length = min(EXPORT_SEQ_LEN, int(info.input_shape[0]))
        fixed = _unrolled(model)
        size = length if fixed else max(2, length - 5 * variant)
        ids = torch.randint(0, min(info.num_classes, 256), (batch_size, size), generator=generator)
        axes: dict[int, str] = {0: "batch"} if fixed else {0: "batch", 1: "sequence"}
        return ExampleInputs((ids,), dynamic_axes={"input": axes, "output": dict(axes)})

    def export_graphs(
        self, model: nn.Module, info: DataInfo, dtype: torch.dtype
    ) -> list[ExportGraph]:
        """The model as one file; a recurrent one says the length it was traced at."""
        graphs = super().export_graphs(model, info, dtype)
        if _unrolled(model):
            length = min(EXPORT_SEQ_LEN, int(info.input_shape[0]))
            graphs[0].kind = f"language model (length {length})"
        return graphs


def _unrolled(model: nn.Module) -> bool:
    """A recurrent model traced as a loop unrolled in time: its sequence length is fixed."""
    return bool(getattr(unwrap(model), "unrolled_in_time", False))


def finalize_aux(sums: dict[str, float]) -> dict[str, float]:
    """`aux_loss` (mean per batch), `dropped_frac` and `expert<i>_frac` from `aux_sums`."""
    if "aux_loss" not in sums:
        return {}
    metrics = {"aux_loss": float(sums["aux_loss"]) / max(float(sums["batches"]), 1.0)}
    routed = max(float(sums.get("routed_tokens", 0.0)), 1.0)
    for key, value in sums.items():
        if key.startswith("expert") and key.endswith("_tokens"):
            metrics[key.replace("_tokens", "_frac")] = float(value) / routed
    if "dropped_tokens" in sums:
        metrics["dropped_frac"] = float(sums["dropped_tokens"]) / routed
    return metrics


def _mix(x: Tensor) -> Tensor:
    """A splitmix-style int64 hash (wrapping arithmetic), elementwise."""
    x = (x ^ (x >> 31)) * 0x5DEECE66D + 0xB
    x = (x ^ (x >> 29)) * 0x9E3779B1
    return x ^ (x >> 32)


def hashed_uniform(tokens: Tensor, seed: int, stream: int) -> Tensor:
    """Deterministic uniforms in [0, 1), `(B, T)`, from each sample's tokens and position."""
    weights = torch.arange(1, tokens.shape[1] + 1, device=tokens.device) * 0x9E3779B1
    sample_key = _mix((tokens * weights).sum(dim=1, keepdim=True) + seed * 1_000_003)  # (B, 1)
    positions = torch.arange(tokens.shape[1], device=tokens.device).unsqueeze(0)
    bits = _mix(_mix(sample_key + positions * 0x2545F491 + stream * 0x632BE5AB))  # (B, T)
    return (bits & 0xFFFFFF).double() / float(1 << 24)


@dataclass(frozen=True)
class Masking:
    """BERT's corruption (SEEDS A16): of the selected tokens, `mask_frac` become `[MASK]`,
    `random_frac` a random token, the rest stay (the original paper's 80/10/10).

    The random token is the token at a random position of the same sample: drawn from the
    data's own distribution, whatever the vocabulary (bytes or word pieces), and, like every
    choice here, a function of the sample alone, so each rank corrupts its share of a batch
    as one device would the whole batch."""

    select_frac: float = 0.15
    mask_frac: float = 0.8
    random_frac: float = 0.1
    seed: int = 0

    def apply(self, tokens: Tensor, salt: int = 0) -> tuple[Tensor, Tensor]:
        """Returns the corrupted input and the bool `(B, T)` selection (where the loss is).

        `salt` picks an independent draw (the training epoch under dynamic masking; 0 is the
        evaluation mask); each draw is a function of the sample, the seed and the salt."""
        streams = 3 * salt  # three hash streams per draw: selection, choice, random position
        selected = hashed_uniform(tokens, self.seed, streams) < self.select_frac
        selected &= tokens != PAD_ID
        choice = hashed_uniform(tokens, self.seed, streams + 1)
        to_mask = selected & (choice < self.mask_frac)
        to_random = selected & (choice >= self.mask_frac)
        to_random &= choice < self.mask_frac + self.random_frac
        corrupted = torch.where(to_mask, torch.full_like(tokens, MASK_ID), tokens)
        corrupted = torch.where(to_random, self.random_tokens(tokens, streams + 2), corrupted)
        return corrupted, selected

    def random_tokens(self, tokens: Tensor, stream: int = 2) -> Tensor:
        """For each position, the token at a hashed random position of its sample `(B, T)`; a
        draw that lands on padding keeps the position's own token."""
        length = tokens.shape[1]
        picks = (hashed_uniform(tokens, self.seed, stream) * length).long().clamp_max(length - 1)
        drawn = tokens.gather(1, picks)
        return torch.where(drawn == PAD_ID, tokens, drawn)


class MaskedLMTask(LanguageModelTask):
    """Masked-token prediction: the loss is CE against the original token at selected positions.

    The model sees `batch["input"]` corrupted by `Masking`; `batch["target"]` is not used.
    It does not sample (a masked LM fills in masks, it does not continue a prompt).
    """

    can_sample = False

    def __init__(
        self,
        masking: Masking | None = None,
        label_smoothing: float = 0.0,
        dynamic: bool = True,
    ) -> None:
        super().__init__(label_smoothing)
        self.masking = masking or Masking()
        self.dynamic = dynamic
        self.salt = 0  # the draw in use: the training epoch (dynamic), else 0

    def set_epoch(self, epoch: int | None) -> None:
        """Dynamic masking: training batches of epoch `epoch` get that epoch's masks;
        evaluation (None), and every epoch under static masking, the fixed draw 0."""
        self.salt = epoch if self.dynamic and epoch is not None else 0

    def forward(self, model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
        """Logits `(B, T, V)` of the masked input; the auxiliary losses are kept for `loss`."""
        corrupted, _ = self.masking.apply(batch["input"], self.salt)
        logits = model(corrupted)  # (B, T, V)
        self.aux = _Aux(*collect_aux(model))
        return logits

    def targets(self, batch: dict[str, Tensor]) -> Tensor:
        """The masked positions' original tokens; every other position is padding (ignored)."""
        tokens = batch["input"]
        _, selected = self.masking.apply(tokens, self.salt)
        return torch.where(selected, tokens, torch.full_like(tokens, PAD_ID))
