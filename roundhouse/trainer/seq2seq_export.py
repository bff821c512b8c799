"""ONNX graphs of an encoder-decoder (`seq2seq`): the encoder, and one decoder step (what the
`seq2seq` task's `export_graphs` gives `roundhouse export`).

A runtime decodes with two sessions: `encoder(src) -> memory` once per source, then
`decoder(tgt, memory, src) -> logits` of the next token for the prefix `tgt` (starting at
`BOS`), appending the chosen token until `EOS`, exactly as `Seq2Seq.greedy` does. The source ids
go to the decoder too, for the padding mask of the cross-attention (`src == PAD`).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from roundhouse.data import DataInfo
from roundhouse.data.text import BOS_ID, PAD_ID
from roundhouse.trainer.task_api import ExportGraph


class EncoderPart(nn.Module):
    """`(B, S)` source ids -> the encoder's output `(B, S, C)`."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, src: Tensor) -> Tensor:
        """The memory the decoder attends to."""
        return self.model.encode(src)[0]


class DecoderStep(nn.Module):
    """`(tgt (B, T), memory (B, S, C), src (B, S))` -> next-token logits `(B, V)`."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, tgt: Tensor, memory: Tensor, src: Tensor) -> Tensor:
        """Logits of the token after the prefix `tgt`."""
        return self.model.decode_step(tgt, memory, src == PAD_ID)


def _sources(batch: int, length: int, gen: torch.Generator) -> Tensor:
    src = torch.randint(0, 256, (batch, length), generator=gen)
    src[0, length // 2 :] = PAD_ID  # one padded row: the mask is part of the graph
    return src


def seq2seq_graphs(model: nn.Module, info: DataInfo) -> list[ExportGraph]:
    """The encoder and decoder-step graphs, dynamic in batch, source and target length."""
    length = min(16, int(info.input_shape[0]))
    encoder, step = EncoderPart(model).eval(), DecoderStep(model).eval()

    def encoder_sample(batch: int, gen: torch.Generator, variant: int = 0) -> tuple[Tensor]:
        return (_sources(batch, max(4, length - 3 * variant), gen),)

    def step_sample(batch: int, gen: torch.Generator, variant: int = 0) -> tuple[Tensor, ...]:
        src = _sources(batch, max(4, length - 3 * variant), gen)
        tgt = torch.randint(0, 256, (batch, 3 + variant), generator=gen)
        tgt[:, 0] = BOS_ID
        with torch.no_grad():
            memory = encoder(src)
        return tgt, memory, src

    enc_axes = {"src": {0: "batch", 1: "source"}, "output": {0: "batch", 1: "source"}}
    step_axes = {
        "tgt": {0: "batch", 1: "target"},
        "memory": {0: "batch", 1: "source"},
        "src": {0: "batch", 1: "source"},
        "output": {0: "batch"},
    }
    names = ["tgt", "memory", "src"]
    graphs = [
        ExportGraph(encoder, encoder_sample, ["src"], enc_axes, "seq2seq encoder", False),
        ExportGraph(step, step_sample, names, step_axes, "seq2seq decoder step", False),
    ]
    graphs[0].part, graphs[1].part = "encoder", "decoder"
    return graphs
