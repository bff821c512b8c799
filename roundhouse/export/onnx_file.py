"""ONNX export through torch.onnx, checked with onnxruntime; int8 dynamic quantization.

`export_onnx` traces an `ExportGraph` with torch.onnx's TorchScript exporter (`dynamo=False`:
the dynamo exporter needs `onnxscript`, and the TorchScript one writes the same graphs for the
zoo) with the graph's dynamic axes. `max_abs_diff` runs the file in onnxruntime against the
PyTorch module on fresh sample inputs at two batch sizes (and, for language models, the same
length); `quantize_int8` is onnxruntime's `quantize_dynamic` (int8 weights, activations
quantized on the fly).
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import warnings
from collections.abc import Iterator

import numpy as np
import torch
from torch import Tensor

from roundhouse.export.graph import ExportError, ExportGraph

logger = logging.getLogger(__name__)

OPSET = 17
TOLERANCE = 1e-3  # fp32 ONNX vs PyTorch, max abs difference of the outputs
CHECK_BATCHES = (1, 3)


@contextlib.contextmanager
def native_stdout_silenced() -> Iterator[None]:
    """Silence file descriptor 1: torch.onnx's C++ side prints the whole graph on a failure."""
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 1)
            yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)


def export_onnx(graph: ExportGraph, path: str, model_name: str) -> None:
    """Write `graph` to the local file `path`; an op ONNX cannot express is an ExportError."""
    sample = graph.sample(2, torch.Generator().manual_seed(0))
    try:
        with torch.no_grad(), warnings.catch_warnings(), native_stdout_silenced():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                graph.module,
                sample,
                path,
                input_names=graph.input_names,
                output_names=["output"],
                dynamic_axes=graph.dynamic_axes,
                opset_version=OPSET,
                dynamo=False,
            )
    except Exception as exc:  # torch.onnx raises several types for one cause: an op it lacks
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ExportError(
            f"model {model_name} cannot be exported to ONNX: {first}",
            "export --format safetensors, or replace the op in the model",
        ) from None
    import onnx

    onnx.checker.check_model(path)
    logger.info("exported the %s of %s to %s", graph.kind, model_name, path)


def session(path: str):  # -> onnxruntime.InferenceSession
    """An onnxruntime CPU session for `path`."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def run_session(sess, names: list[str], inputs: tuple[Tensor, ...]) -> np.ndarray:
    """One onnxruntime call on torch inputs."""
    feed = {name: t.numpy() for name, t in zip(names, inputs, strict=True)}
    return sess.run(None, feed)[0]


@torch.no_grad()
def max_abs_diff(graph: ExportGraph, path: str) -> float:
    """Max abs difference of onnxruntime's and PyTorch's outputs on fresh sample inputs."""
    sess = session(path)
    gen = torch.Generator().manual_seed(1)
    worst = 0.0
    for variant, batch in enumerate(CHECK_BATCHES, start=1):
        inputs = graph.sample(batch, gen, variant)
        try:
            ours = run_session(sess, graph.input_names, inputs)
        except Exception as exc:  # onnxruntime's own error types; the cause is the graph
            raise ExportError(
                f"the ONNX file fails on inputs of other sizes than the traced ones: "
                f"{str(exc).splitlines()[0][:200]}",
                "the model has a size torch.onnx traced as a constant; use --format safetensors",
            ) from None
        theirs = graph.module(*inputs).float().numpy()
        if ours.shape != theirs.shape:
            raise ExportError(
                f"the ONNX file gives shape {ours.shape}, PyTorch {theirs.shape}",
                "the model's output depends on the batch in a way torch.onnx cannot trace",
            )
        worst = max(worst, float(np.abs(ours - theirs).max()))
    return worst


def check_parity(graph: ExportGraph, path: str, tolerance: float = TOLERANCE) -> float:
    """`max_abs_diff`, an ExportError above `tolerance`."""
    diff = max_abs_diff(graph, path)
    if diff > tolerance:
        raise ExportError(
            f"onnxruntime and PyTorch differ by {diff:.3g} (tolerance {tolerance:g})",
            "the model has an op torch.onnx exports inexactly; use --format safetensors",
        )
    return diff


def quantize_int8(src: str, dst: str) -> None:
    """onnxruntime dynamic quantization: int8 weights of MatMul/Gemm/Conv, per channel."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    logging.disable(logging.WARNING)  # its advice to pre-process goes to the root logger
    try:
        quantize_dynamic(src, dst, weight_type=QuantType.QInt8, per_channel=True)
    finally:
        logging.disable(logging.NOTSET)
    logger.info("quantized %s -> %s", src, dst)


def file_size(path: str) -> int:
    """The size in bytes of the local file `path`."""
    return os.path.getsize(path)
