"""The adapter state of a job's model (`init_from`, `freeze`, LoRA), applied as training applies it.

`run_worker` loads `model.init_from`, freezes `trainer.freeze` and then injects the LoRA adapters
(which freeze the whole base). Every command that reports on a job's model (`--dry-run`,
`models summary`) applies the same three steps through `apply_adapter_state`, so its trainable
and frozen counts are the ones the run logs. It works on the meta device: nothing is hashed or
allocated there.
"""

from __future__ import annotations

from torch import nn

from roundhouse.config import JobSpec
from roundhouse.trainer.checks import check_finetune
from roundhouse.weights.lora import apply_lora
from roundhouse.weights.pretrained import LoadReport


def apply_adapter_state(model: nn.Module, job: JobSpec) -> LoadReport | None:
    """`init_from`, `freeze` and `param_groups` checks, then LoRA, in place, in training's order.

    Returns:
        The `init_from` load report (None when the job has none).

    Raises:
        RoundhouseError: the one-line error the job would hit at start (a bad `init_from`,
            a freeze glob or LoRA target matching nothing).
    """
    report = check_finetune(job, model)
    apply_lora(model, job)
    return report
