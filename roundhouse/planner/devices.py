"""Accelerators the planner knows: memory capacity and dense peak FLOP/s.

A GPU cluster can be planned from a laptop: `--device H100-80GB` takes its figures from
`ACCELERATORS`, and only `cpu` (this machine) is measured. Peak figures are the vendors' dense
(no sparsity) tensor-core numbers; `MFU` is the fraction of peak a well-tuned training step
reaches, which turns a peak into the rate the planner divides FLOPs by.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

from roundhouse.errors import JobFileError

GB = 1e9
TERA = 1e12
# Fraction of dense peak a training step of a transformer reaches on a GPU (Megatron, PaLM and
# torchtitan report 40-55 %); used only where no calibration on the device itself exists.
MFU = 0.45


@dataclass(frozen=True)
class Accelerator:
    """One device kind.

    Attributes:
        name: The name `--device` takes.
        memory_bytes: Memory one worker may use.
        peak_bf16: Dense bf16 FLOP/s (tensor cores).
        peak_fp32: Dense fp32 FLOP/s (TF32 where the device has it, as PyTorch uses by default
            for matmuls only when asked; the plain fp32 figure otherwise).
        link_bytes_per_s: Default per-worker network bandwidth for collectives between nodes
            (`--bandwidth` overrides it).
        hbm_bytes_per_s: Memory bandwidth (an optimizer step streams its state through it).
        is_gpu: Whether training runs in bf16 mixed precision by default (`precision: auto`).
    """

    name: str
    memory_bytes: float
    peak_bf16: float
    peak_fp32: float
    link_bytes_per_s: float
    hbm_bytes_per_s: float = 1e12
    is_gpu: bool = True


def _gpu(
    name: str, mem_gb: float, bf16_tf: float, fp32_tf: float, link_gbs: float, hbm_tbs: float
) -> Accelerator:
    return Accelerator(
        name, mem_gb * GB, bf16_tf * TERA, fp32_tf * TERA, link_gbs * GB, hbm_tbs * TERA
    )


# NVLink-class bandwidth inside a node is far above the per-GPU network link; a plan for N
# workers across nodes is bounded by the network, so the default is a 400 Gb/s NIC per GPU.
ACCELERATORS: dict[str, Accelerator] = {
    a.name: a
    for a in (
        _gpu("H100-80GB", 80, 989, 67, 50, 3.35),
        _gpu("H200", 141, 989, 67, 50, 4.8),
        _gpu("A100-80GB", 80, 312, 19.5, 25, 2.0),
        _gpu("A100-40GB", 40, 312, 19.5, 25, 1.55),
        _gpu("L4", 24, 121, 30, 12.5, 0.3),
        _gpu("A10G", 24, 70, 31, 12.5, 0.6),
        _gpu("V100", 32, 125, 15.7, 12.5, 0.9),
    )
}
ALIASES = {"H100": "H100-80GB", "A100": "A100-80GB"}


def known_devices() -> list[str]:
    """Every name `--device` accepts."""
    return ["cpu", "cuda", *ACCELERATORS]


def get_accelerator(name: str) -> Accelerator | None:
    """The table entry for `name` (case-insensitive), None for `cpu`/`cuda` (measured here).

    Raises:
        JobFileError: `name` is not a known device; the message lists the known ones.
    """
    if name.lower() in ("cpu", "cuda"):
        return None
    wanted = ALIASES.get(name.upper(), name)
    for key, accelerator in ACCELERATORS.items():
        if key.lower() == wanted.lower():
            return accelerator
    raise JobFileError(f"unknown --device {name!r}", f"known devices: {', '.join(known_devices())}")


def cpu_memory_bytes() -> float:
    """Physical memory of this machine."""
    return float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


_UNITS = {"": 1, "k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12}


def parse_bandwidth(text: str) -> float:
    """`25GB/s` -> 25e9 bytes/s; `100Gb/s` (bits) -> 12.5e9; `1e9` -> 1e9.

    Raises:
        JobFileError: the text is not a positive bandwidth.
    """
    match = re.fullmatch(
        r"\s*([0-9.]+(?:e[0-9]+)?)\s*([kKmMgGtT]?)(b|bit|bits|B)?(/s|ps)?\s*", text
    )
    value = float(match.group(1)) * _UNITS[match.group(2).lower()] if match else 0.0
    if match and match.group(3) in ("b", "bit", "bits"):
        value /= 8
    if value <= 0:
        raise JobFileError(
            f"--bandwidth {text!r} is not a bandwidth", "write it like 25GB/s or 100Gb/s"
        )
    return value
