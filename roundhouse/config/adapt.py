"""Job-file sections for adapting a trained model: `model.lora` and `trainer.distill`."""

from __future__ import annotations

from typing import Annotated

from pydantic import Field, PositiveFloat, PositiveInt

from .base import Section


class LoraConfig(Section):
    """Low-rank adapters (through `peft`) on the Linear and Conv layers that `targets` match.

    Only the adapters train, are exchanged between workers and are checkpointed; the base
    weights stay frozen and are rebuilt from the job (model, seed, `init_from`) on resume.
    """

    rank: PositiveInt = Field(8, description="Rank r of each adapter (A: r x in, B: out x r).")
    alpha: PositiveFloat = Field(16.0, description="Scale: the update is (alpha / rank) * B A.")
    dropout: Annotated[float, Field(ge=0, lt=1)] = Field(0.0, description="Dropout on the input.")
    targets: list[str] = Field(
        min_length=1,
        description="Globs over module names (`roundhouse models summary` lists them), "
        "e.g. ['blocks.*.attn.*', 'blocks.*.mlp.*'].",
    )


class DistillConfig(Section):
    """Knowledge distillation from a frozen teacher with the same output space.

    The loss is `alpha * T^2 * KL(softmax(z_t / T) || softmax(z_s / T)) + (1 - alpha) * task`.
    """

    teacher: str = Field(
        description="The teacher: a roundhouse run folder or checkpoints/step_<N> folder, or a "
        "Hugging Face GPT-2/BERT folder (config.json + weights), on any fsspec URL."
    )
    temperature: PositiveFloat = Field(2.0, description="Softmax temperature T.")
    alpha: Annotated[float, Field(ge=0, le=1)] = Field(
        0.5, description="Weight of the distillation term (1 - alpha: the task loss)."
    )
