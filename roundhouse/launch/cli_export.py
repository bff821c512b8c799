"""`roundhouse export RUN|CKPT|JOB.yaml --format safetensors|onnx [--quantize int8] [--merge-lora]
[--out PATH] [--step N]`.

RUN is a run folder (its latest checkpoint, or `--step`), CKPT one `checkpoints/step_<N>`
folder, on any fsspec URL; JOB.yaml a job file, whose model is built as training would build
it (with `model.init_from` where the job has one) and exported untrained. `ckpt export RUN --to
PATH` is the older spelling of `export RUN --out PATH` (safetensors).
"""

from __future__ import annotations

import argparse
import logging

logger = logging.getLogger(__name__)


def add_export_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `roundhouse export`."""
    parser.add_argument("source", metavar="RUN|CKPT|JOB.yaml", help="what to export")
    parser.add_argument("--format", default="safetensors", choices=("safetensors", "onnx"))
    parser.add_argument("--quantize", choices=("int8",), help="onnxruntime dynamic quantization")
    parser.add_argument(
        "--merge-lora", action="store_true", help="fold LoRA adapters into the base weights"
    )
    parser.add_argument("--out", metavar="PATH", help="output file (default: <job name>.<ext>)")
    parser.add_argument("--step", type=int, help="checkpoint step (default: latest)")


def add_export_parser(
    commands: argparse._SubParsersAction, common: argparse.ArgumentParser
) -> None:
    """Add the `export` command to the CLI's subcommands."""
    export = commands.add_parser(
        "export", parents=[common], help="write a model as safetensors or ONNX (int8 optional)"
    )
    add_export_arguments(export)


def is_job_file(source: str) -> bool:
    """Whether an export source names a job file (`.yaml`/`.yml`) rather than a run."""
    return source.endswith((".yaml", ".yml"))


def default_out(name: str, fmt: str, quantize: str | None) -> str:
    """The output file name when `--out` is not given: `NAME[.int8].FORMAT`."""
    return f"{name}{'.int8' if quantize else ''}.{fmt}"


def cmd_export(args: argparse.Namespace) -> int:
    """Export, then print what was written (and the checks' figures)."""
    from roundhouse.export import ExportOptions, check_options, export_model

    options = ExportOptions(args.format, args.quantize, args.merge_lora, args.out or "")
    check_options(options)
    plain = not is_job_file(args.source) and options.format == "safetensors"
    if plain and print_plain_weights(args, options):
        return 0
    saved = load_source(args)
    options.out = options.out or default_out(saved.job.name, options.format, options.quantize)
    for line in export_model(saved, options):
        print(line)
    return 0


def print_plain_weights(args: argparse.Namespace, options: object) -> bool:
    """A checkpoint without adapters goes to safetensors as saved (no model rebuilt)."""
    from roundhouse.export import write_safetensors
    from roundhouse.weights.saved_model import load_checkpoint_state, read_run_job

    run_dir, _, state = load_checkpoint_state(args.source, args.step)
    if "lora" in state:
        return False
    weights = state["strategy"]["model"]
    out = options.out or default_out(read_run_job(run_dir).name, "safetensors", None)
    size = write_safetensors(weights, out)
    count = sum(t.numel() for t in weights.values())
    print(f"wrote {out}: {len(weights)} tensors, {count:,} values, {size:,} bytes")
    return True


def load_source(args: argparse.Namespace):  # -> SavedModel
    """The model to export: a run's checkpoint loaded onto its model, or a job's new model."""
    from roundhouse.weights.saved_model import SavedModel, build_job_model, load_saved_model

    if not is_job_file(args.source):
        return load_saved_model(args.source, args.step)
    from roundhouse.config.loading import load_job

    job = load_job(args.source, [])
    model, lora, splits = build_job_model(job)
    return SavedModel(job, model.eval(), splits, lora)
