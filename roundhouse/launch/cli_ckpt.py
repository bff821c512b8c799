"""`roundhouse ckpt export RUN --to model.safetensors [--step N]`: alias of `roundhouse export`.

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
    """`ckpt export RUN --to PATH`: an alias of `roundhouse export RUN --out PATH`."""
    from roundhouse.launch.cli_export import cmd_export

    export = argparse.Namespace(
        source=args.run,
        format="safetensors",
        quantize=None,
        merge_lora=False,
        out=args.to,
        step=args.step,
    )
    return cmd_export(export)


def load_model_weights(ref: str, step: int | None) -> dict[str, torch.Tensor]:
    """The consolidated model weights of checkpoint `step` (None: latest) of run `ref`."""
    from roundhouse.weights.saved_model import load_model_weights as load

    return load(ref, step)


def write_safetensors(weights: dict[str, torch.Tensor], path: str) -> int:
    """Write `weights` to `path` (any fsspec URL); return the bytes written."""
    from roundhouse.export import write_safetensors as write

    return write(weights, path)
