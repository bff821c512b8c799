"""`roundhouse ckpt export RUN --to model.safetensors [--step N]`: a consolidated model file.

RUN is a run folder (or one of its `checkpoints/step_<N>` folders) on any fsspec URL; `--step`
picks a checkpoint (default: latest). Every strategy's checkpoint holds the consolidated model
weights (`DeepSpeed` gathers its ZeRO partitions, tensor-parallel shards and pipeline stages
when it saves), so the export is the same for all of them: the weights named as
`model.state_dict()` names them, written as safetensors that plain PyTorch loads with
`model.load_state_dict(safetensors.torch.load_file(path))`. The checkpoint's sha256 is checked
and it is read with `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import argparse
import logging

import torch

from roundhouse.errors import CheckpointError

logger = logging.getLogger(__name__)


def add_ckpt_parser(commands: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    """Add `roundhouse ckpt` (inspect and export a run's checkpoints)."""
    ckpt = commands.add_parser("ckpt", parents=[common], help="checkpoint tools")
    sub = ckpt.add_subparsers(dest="ckpt_command", required=True, metavar="SUBCOMMAND")
    export = sub.add_parser(
        "export", parents=[common], help="write a run's model weights as one safetensors file"
    )
    export.add_argument("run", help="run folder, or a checkpoints/step_<N> folder")
    export.add_argument("--to", required=True, metavar="PATH", help="output .safetensors file")
    export.add_argument("--step", type=int, help="checkpoint step (default: latest)")


def cmd_ckpt(args: argparse.Namespace) -> int:
    """`ckpt export`: print where the weights went and how many tensors/parameters."""
    weights = load_model_weights(args.run, args.step)
    size = write_safetensors(weights, args.to)
    count = sum(t.numel() for t in weights.values())
    print(f"wrote {args.to}: {len(weights)} tensors, {count:,} values, {size:,} bytes")
    return 0


def load_model_weights(ref: str, step: int | None) -> dict[str, torch.Tensor]:
    """The consolidated model weights of checkpoint `step` (None: latest) of run `ref`."""
    from roundhouse.runs.rundir import RunDir
    from roundhouse.trainer.checkpoint import MANIFEST, Checkpointer

    target = RunDir(ref.rstrip("/"))
    if target.exists(MANIFEST):  # a checkpoints/step_<N> folder
        step = step if step is not None else int(target.url.rsplit("_", 1)[-1])
        target = RunDir(target.url.rsplit("/", 2)[0])
    checkpointer = Checkpointer(target, keep_last=1, identity={})
    available = checkpointer.complete_steps()
    if not available or (step is not None and step not in available):
        raise CheckpointError(
            f"no checkpoint{'' if step is None else f' step_{step}'} in {target.url}",
            f"available steps: {', '.join(map(str, available)) or 'none'}",
        )
    state = checkpointer.load(step)
    return state["strategy"]["model"]


def write_safetensors(weights: dict[str, torch.Tensor], path: str) -> int:
    """Write `weights` to `path` (any fsspec URL); return the bytes written.

    Tied weights (one tensor under two names) are stored as two copies: safetensors refuses
    shared storage, and `load_state_dict` re-ties them through the module.
    """
    import fsspec
    from safetensors.torch import save

    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in weights.items()}
    data = save(tensors, metadata={"format": "pt", "source": "roundhouse"})
    with fsspec.open(path, "wb") as f:
        f.write(data)
    logger.info("exported %d tensors to %s", len(tensors), path)
    return len(data)
