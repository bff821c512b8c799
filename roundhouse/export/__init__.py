"""`roundhouse export`: a trained model as a safetensors or ONNX file (optionally int8).

`export_model(source, options)` turns a `SavedModel` (a run's checkpoint rebuilt onto its
model, or a job file's freshly built model) into one file and returns the report lines the CLI
prints. Everything is written in a temporary folder first and copied to `options.out` (any
fsspec URL) only when every check passed, so a failed export leaves nothing behind.
"""

from __future__ import annotations

import logging
import os
import tempfile
from dataclasses import dataclass

import fsspec
import numpy as np
import torch
from torch import nn

from roundhouse.export.graph import ExportError, ExportGraph, build_graphs
from roundhouse.export.onnx_file import (
    check_parity,
    export_onnx,
    file_size,
    quantize_int8,
    run_session,
    session,
)
from roundhouse.weights.lora import merge_lora
from roundhouse.weights.saved_model import SavedModel

logger = logging.getLogger(__name__)

__all__ = ["ExportError", "ExportOptions", "export_model", "write_safetensors"]

FORMATS = ("safetensors", "onnx")


@dataclass
class ExportOptions:
    """What `roundhouse export` was asked for."""

    format: str = "safetensors"
    quantize: str | None = None
    merge_lora: bool = False
    out: str = "model.safetensors"


def write_safetensors(weights: dict[str, torch.Tensor], path: str) -> int:
    """Write `weights` to `path` (any fsspec URL); return the bytes written.

    Tied weights (one tensor under two names) are stored as two copies: safetensors refuses
    shared storage, and `load_state_dict` re-ties them through the module.
    """
    from safetensors.torch import save

    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in weights.items()}
    data = save(tensors, metadata={"format": "pt", "source": "roundhouse"})
    with fsspec.open(path, "wb") as f:
        f.write(data)
    logger.info("exported %d tensors to %s", len(tensors), path)
    return len(data)


def check_options(options: ExportOptions) -> None:
    """Format and quantization combinations that exist."""
    if options.format not in FORMATS:
        raise ExportError(f"--format {options.format!r} is unknown", f"valid: {', '.join(FORMATS)}")
    if options.quantize not in (None, "int8"):
        raise ExportError(f"--quantize {options.quantize!r} is unknown", "valid: int8")
    if options.quantize and options.format != "onnx":
        raise ExportError(
            "--quantize int8 writes an ONNX file (onnxruntime dynamic quantization)",
            "add --format onnx",
        )


def export_model(saved: SavedModel, options: ExportOptions) -> list[str]:
    """Write `saved`'s model as `options` ask; return the lines to print."""
    check_options(options)
    if options.merge_lora and saved.lora is not None:
        merge_lora(saved.model)
        saved.lora = None
    if options.format == "safetensors":
        weights = saved.model.state_dict()
        size = write_safetensors(weights, options.out)
        count = sum(t.numel() for t in weights.values())
        return [f"wrote {options.out}: {len(weights)} tensors, {count:,} values, {size:,} bytes"]
    graphs = build_graphs(saved)
    lines, written = [], []
    with tempfile.TemporaryDirectory(prefix="roundhouse-export-") as tmp:
        for part in graphs:  # every part is checked before any is published
            folder = os.path.join(tmp, part.part or "model")
            os.makedirs(folder)
            part_lines, final = write_onnx(saved, part, options, folder)
            lines += part_lines
            written.append((final, part_url(options.out, part.part)))
        for final, out in written:
            with open(final, "rb") as src, fsspec.open(out, "wb") as dst:
                dst.write(src.read())
    return [*lines, *(f"wrote {out}: {file_size_text(out)}" for _, out in written)]


def part_url(out: str, part: str | None) -> str:
    """`model.onnx` for a one-file export; `model.encoder.onnx` for its `encoder` part."""
    if part is None:
        return out
    stem, dot, ext = out.rpartition(".")
    return f"{stem}.{part}.{ext}" if dot else f"{out}.{part}"


def write_onnx(
    saved: SavedModel, graph: ExportGraph, options: ExportOptions, tmp: str
) -> tuple[list[str], str]:
    """Export (and quantize) in `tmp`; the report lines and the file to publish."""
    fp32 = os.path.join(tmp, "model.onnx")
    export_onnx(graph, fp32, saved.job.model.name)
    diff = check_parity(graph, fp32)
    lines = [
        f"onnx: the {graph.kind} of {saved.job.model.name}:{saved.job.model.flavor}, "
        f"max abs difference to PyTorch {diff:.2e}, {file_size(fp32):,} bytes"
    ]
    if options.quantize is None:
        return lines, fp32
    int8 = os.path.join(tmp, "model.int8.onnx")
    quantize_int8(fp32, int8)
    ratio = file_size(int8) / file_size(fp32)
    lines.append(f"int8: {file_size(int8):,} bytes ({ratio:.2f}x the fp32 file)")
    if graph.scored:
        before = test_accuracy_torch(saved, graph.module)
        after = test_accuracy_onnx(saved, graph, int8)
        lines.append(f"test accuracy: fp32 {before:.4f} -> int8 {after:.4f}")
    return lines, int8


def file_size_text(url: str) -> str:
    """The size of the file at `url` (any fsspec URL), for people."""
    fs, path = fsspec.core.url_to_fs(url)
    return f"{fs.size(path):,} bytes"


def _test_batches(saved: SavedModel):
    return saved.splits.eval_loader(
        "test", batch_size=saved.job.data.eval_batch_size, rank=0, world_size=1
    )


def _correct(logits: np.ndarray, target: np.ndarray) -> tuple[int, int]:
    """Top-1 hits and counted rows (language models: targets that are not PAD)."""
    predicted = logits.argmax(axis=-1)
    if logits.ndim == 3:
        from roundhouse.data.text import PAD_ID

        valid = target != PAD_ID
        return int(((predicted == target) & valid).sum()), int(valid.sum())
    return int((predicted == target).sum()), int(target.size)


@torch.no_grad()
def test_accuracy_torch(saved: SavedModel, module: nn.Module) -> float:
    """Top-1 accuracy of the PyTorch model on the run's test split."""
    hits = rows = 0
    for batch in _test_batches(saved):
        h, r = _correct(module(batch["input"]).float().numpy(), batch["target"].numpy())
        hits, rows = hits + h, rows + r
    return hits / max(rows, 1)


def test_accuracy_onnx(saved: SavedModel, graph: ExportGraph, path: str) -> float:
    """Top-1 accuracy of the ONNX file (onnxruntime, CPU) on the run's test split."""
    sess = session(path)
    hits = rows = 0
    for batch in _test_batches(saved):
        logits = run_session(sess, graph.input_names, (batch["input"],))
        h, r = _correct(logits, batch["target"].numpy())
        hits, rows = hits + h, rows + r
    return hits / max(rows, 1)
