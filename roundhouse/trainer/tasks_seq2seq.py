"""The `seq2seq` task: teacher-forced cross-entropy, and BLEU of greedy decodes on evaluation.

Batches are `{"input": (B, S) source ids, "target": (B, T + 1) = BOS y1 .. yn EOS PAD..}` (see
`builtin:pydoc-pairs`). Training: the model reads `target[:, :-1]` and predicts `target[:, 1:]`
(padding ignored). Evaluation also decodes every source greedily (the model in eval mode) and
scores the decodes against the references with sacrebleu's corpus BLEU (its default `13a`
tokenisation and `exp` smoothing, as `sacrebleu.corpus_bleu`). BLEU is built from n-gram
match and total counts and the hypothesis/reference lengths; those add up over batches and
ranks, so the BLEU every strategy reports is the corpus BLEU of the whole split, exactly.

Metrics: `loss` (nats per target token), `perplexity`, `accuracy` (teacher-forced next token)
and `bleu` (0-100).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from roundhouse.data import DataInfo
from roundhouse.data.pydoc_corpus import pairs_decoder, pairs_tokenizer
from roundhouse.data.text import EOS_ID, PAD_ID, decode
from roundhouse.trainer.sampling import SEQ2SEQ_OPTIONS, seq2seq_text
from roundhouse.trainer.task_api import ExampleInputs, ExportGraph, SampleRequest, Task, TaskError

if TYPE_CHECKING:
    from roundhouse.config import JobSpec

NGRAMS = 4
PAIR_SOURCES = ("builtin:pydoc-pairs", "builtin:unicode-pairs")  # whose `tokenizer` we decode


def bleu_stats(hypotheses: list[str], references: list[str]) -> dict[str, float]:
    """sacrebleu's corpus statistics: `bleu_correct<n>`, `bleu_total<n>`, `bleu_sys/ref`."""
    from sacrebleu.metrics import BLEU

    score = BLEU().corpus_score(hypotheses, [references])
    stats = {f"bleu_correct{n}": float(c) for n, c in enumerate(score.counts)}
    stats |= {f"bleu_total{n}": float(t) for n, t in enumerate(score.totals)}
    return stats | {"bleu_sys": float(score.sys_len), "bleu_ref": float(score.ref_len)}


def bleu_from_stats(sums: dict[str, float]) -> float:
    """Corpus BLEU (0-100) from summed `bleu_stats`."""
    from sacrebleu.metrics import BLEU

    correct = [int(sums[f"bleu_correct{n}"]) for n in range(NGRAMS)]
    total = [int(sums[f"bleu_total{n}"]) for n in range(NGRAMS)]
    sys_len, ref_len = int(sums["bleu_sys"]), int(sums["bleu_ref"])
    bleu = BLEU.compute_bleu(correct, total, sys_len, ref_len, smooth_method="exp")
    return float(bleu.score)


def texts(ids: Tensor, decoder: Callable[[Sequence[int]], str] = decode) -> list[str]:
    """Each row's text up to its first `EOS`/`PAD` (`decoder` turns ids into text; bytes by
    default)."""
    out = []
    for row in ids.tolist():
        end = next((i for i, t in enumerate(row) if t in (PAD_ID, EOS_ID)), len(row))
        out.append(decoder(row[:end]))
    return out


def unwrap(model: nn.Module) -> nn.Module:
    """The `Seq2Seq` inside a DeepSpeed engine / DDP wrapper (or the model itself)."""
    # Not `hasattr(model, "greedy")`: DeepSpeed's engine forwards unknown attributes to its
    # module, so it would pass for the model itself (and its `training` is its own).
    while isinstance(getattr(model, "module", None), nn.Module):
        model = model.module
    return model


class Seq2SeqTask(Task):
    """Teacher-forced CE; evaluation adds corpus BLEU of greedy decodes.

    Args:
        label_smoothing: Of the cross-entropy.
        decoder: Ids -> text, the data's tokenizer (bytes by default); BLEU scores text.
    """

    can_sample = True  # `roundhouse sample --prompt SOURCE [--beam N]`: the decoded target
    sample_kind = "text"
    sample_options = SEQ2SEQ_OPTIONS

    def __init__(
        self, label_smoothing: float = 0.0, decoder: Callable[[Sequence[int]], str] = decode
    ) -> None:
        self.label_smoothing = label_smoothing
        self.decoder = decoder
        self.decoded: list[str] | None = None

    @classmethod
    def from_job(cls, job: JobSpec, **options: Any) -> Seq2SeqTask:
        """The task with the job's label smoothing and its data's tokenizer (word pieces of
        `builtin:pydoc-pairs` with `tokenizer: words`, else bytes)."""
        tokenizer = None
        data = getattr(job, "data", None)  # `build_task` passes the loss settings only
        if data is not None and data.source in PAIR_SOURCES:
            tokenizer = pairs_tokenizer(dict(data.options), data.source)
        smoothing = job.trainer.loss.label_smoothing
        return cls(label_smoothing=smoothing, decoder=pairs_decoder(tokenizer), **options)

    def metric_names(self) -> tuple[str, ...]:
        """The metrics `finalize` returns."""
        return ("loss", "perplexity", "accuracy", "bleu")

    def forward(self, model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
        """Logits `(B, T, V)` of the shifted-right target; in eval mode also greedy decodes."""
        target = batch["target"]
        logits = model(batch["input"], target[:, :-1])
        self.decoded = None
        inner = unwrap(model)
        if not inner.training:
            ids = inner.greedy(batch["input"], max_len=target.shape[1] - 1)
            self.decoded = texts(ids, self.decoder)
        return logits

    def token_losses(self, outputs: Tensor, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """Summed CE over the real target tokens, and their number."""
        target = batch["target"][:, 1:]
        loss = F.cross_entropy(
            outputs.float().flatten(0, 1),
            target.flatten(),
            ignore_index=PAD_ID,
            reduction="sum",
            label_smoothing=self.label_smoothing,
        )
        return loss, (target != PAD_ID).sum()

    def loss_items(self, batch: dict[str, Tensor]) -> int:
        """The real (non-`PAD`) target tokens `loss` averages over."""
        return int((batch["target"][:, 1:] != PAD_ID).sum())

    def loss(self, outputs: Tensor, batch: dict[str, Tensor]) -> Tensor:
        """Mean CE per target token."""
        total, count = self.token_losses(outputs, batch)
        return total / count.clamp(min=1)

    def eval_sums(self, outputs: Tensor, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """Summed loss, tokens, hits and the BLEU statistics of the batch's greedy decodes."""
        total, count = self.token_losses(outputs, batch)
        target = batch["target"][:, 1:]
        correct = ((outputs.argmax(-1) == target) & (target != PAD_ID)).sum()
        sums = {"loss": total.detach(), "count": count.float(), "correct": correct.float()}
        if self.decoded is not None:
            refs = texts(target, self.decoder)
            stats = bleu_stats(self.decoded, refs)
            sums |= {k: torch.tensor(v, device=outputs.device) for k, v in stats.items()}
        return sums

    def finalize(self, sums: dict[str, float]) -> dict[str, float]:
        """Loss, perplexity, accuracy and (when decoded) BLEU over every batch and rank."""
        n = max(float(sums["count"]), 1.0)
        loss = float(sums["loss"]) / n
        metrics = {
            "loss": loss,
            "perplexity": math.exp(min(loss, 50.0)),
            "accuracy": float(sums["correct"]) / n,
        }
        if "bleu_sys" in sums:
            metrics["bleu"] = bleu_from_stats(sums)
        return metrics

    def example_inputs(
        self, input_shape: tuple[int, ...], dtype: torch.dtype, batch_size: int, device: object
    ) -> ExampleInputs:
        """Source ids `(B, S)` and a target prefix `(B, S)` (what `forward` feeds the model)."""
        ids = torch.zeros((batch_size, *input_shape), dtype=torch.long, device=device)
        return ExampleInputs((ids, ids.clone()), names=("src", "tgt"))

    def export_graphs(
        self, model: nn.Module, info: DataInfo, dtype: torch.dtype
    ) -> list[ExportGraph]:
        """`export` writes two files: the encoder and one decoder step
        (`roundhouse/trainer/seq2seq_export.py`)."""
        from roundhouse.trainer.seq2seq_export import seq2seq_graphs

        return seq2seq_graphs(unwrap(model).eval(), info)

    def check_sample(self, request: SampleRequest, job: Any) -> None:
        """The seq2seq flags, and `--prompt` (the source) is required."""
        super().check_sample(request, job)
        if not request.prompt:
            name = f"{job.model.name}:{job.model.flavor}"
            raise TaskError(f"seq2seq model {name} needs --prompt (the source)", "pass --prompt")

    def sample_output(self, model: nn.Module, request: SampleRequest, job: Any) -> str:
        """The decoded target of `--prompt`: greedy, or the best of a `--beam` search."""
        return seq2seq_text(unwrap(model).eval(), request, job)
