"""`roundhouse sample RUN`: what the run's task draws (`Task.sample_output`): images from a
diffusion, VAE or GAN run, text from a language-model or seq2seq run.

    roundhouse sample RUN [--sampler ddpm|ddim] [--steps 50] [--eta 0] [--guidance 3.0]
                          [--class 7] [--num 64] [--out grid.png] [--seed 0]
    roundhouse sample RUN --prompt "def " [--max-new-tokens 200] [--temperature 0.8] [--top-k 40]

RUN is a run folder (its latest checkpoint) or one of its `checkpoints/step_<N>` folders, on any
fsspec URL. The run's `job.yaml` rebuilds the model; the checkpoint is read with
`torch.load(weights_only=True)` after its sha256 is checked. Image models write a PNG grid
(`--class` fixes the class of a class-conditional model; otherwise rows cycle through the
classes). Language models print the prompt and its continuation (temperature 0 is greedy).
The command tests no model family or task name: the task says whether it samples, which flags
it takes (`Task.sample_options`; any other flag given is an error, not silently ignored) and
whether its output is images or text (`Task.sample_kind`).
"""

from __future__ import annotations

import argparse
import logging
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from roundhouse.errors import CheckpointError, JobFileError
from roundhouse.trainer.task_api import SampleRequest

logger = logging.getLogger(__name__)


def add_sample_parser(
    commands: argparse._SubParsersAction, common: argparse.ArgumentParser
) -> None:
    """Registers `roundhouse sample`; flags default to None so the command sees what was given."""
    sample = commands.add_parser("sample", parents=[common], help="sample images or text")
    sample.add_argument("run", help="run folder, or a checkpoints/step_<N> folder")
    sample.add_argument("--out", help="output file (PNG for images; text is also printed)")
    sample.add_argument("--seed", type=int, default=0)
    images = sample.add_argument_group("image models (diffusion, vae)")
    images.add_argument("--sampler", choices=("ddpm", "ddim"), help="default ddim")
    images.add_argument("--steps", type=int, help="sampling steps (default 50)")
    images.add_argument("--eta", type=float, help="DDIM eta (default 0)")
    images.add_argument("--guidance", type=float, help="classifier-free guidance (default 3)")
    images.add_argument("--class", dest="class_label", type=int, help="class to generate")
    images.add_argument("--num", type=int, help="number of images (default 64)")
    text = sample.add_argument_group("language models (and text-conditioned diffusion)")
    text.add_argument("--prompt", help="text to continue (or the caption of a text condition)")
    text.add_argument("--max-new-tokens", type=int, help="bytes to generate (default 200)")
    text.add_argument("--temperature", type=float, help="0 = greedy (default 0.8)")
    text.add_argument("--top-k", type=int, help="sample among the k most likely bytes")
    text.add_argument("--beam", type=int, help="seq2seq: beam width (default 1: greedy)")
    sample.add_argument(
        "--score",
        metavar="CLASSIFIER_RUN",
        help="also print the FID of the images against the test split, in the features of "
        "this classifier run (trained on the same data)",
    )


@dataclass
class LoadedRun:
    """A run's job, its model (weights loaded, eval mode) and the model's task kind."""

    job: Any
    model: torch.nn.Module
    task: str
    step: int


def read_run(ref: str) -> tuple[Any, Any, int | None]:
    """`(job, run folder, step or None for latest)` of a run or `checkpoints/step_<N>` folder.

    Raises:
        CheckpointError: No run at `ref`.
    """
    from roundhouse.config.loading import parse_job_text
    from roundhouse.runs.rundir import RunDir
    from roundhouse.weights.checkpoint import MANIFEST

    target, step = RunDir(ref.rstrip("/")), None
    if target.exists(MANIFEST):  # a checkpoints/step_<N> folder
        step = int(target.url.rsplit("/", 1)[-1].removeprefix("step_"))
        target = RunDir(target.url.rsplit("/", 2)[0])
    if not target.exists("job.yaml"):
        raise CheckpointError(
            f"no run at {ref!r} (no job.yaml)",
            "pass a run folder such as runs/<job name>/<run id>, or a checkpoints/step_<N> folder",
        )
    job = parse_job_text(target.read_text("job.yaml"), source=f"{ref}/job.yaml")
    return job, target, step


def load_run(ref: str) -> LoadedRun:
    """Rebuilds the model of run `ref` from its `job.yaml` and loads its checkpoint.

    The model is rebuilt with the run's adapter state (`saved_model.load_saved_model`): a LoRA
    run's checkpoint holds only the adapters, so its base is rebuilt as training built it and
    the adapters are folded into it (sampling needs no separate adapter layers).

    Raises:
        CheckpointError: No run or no checkpoint at `ref`, or a corrupt one.
    """
    from roundhouse import models
    from roundhouse.weights.saved_model import load_saved_model

    saved = load_saved_model(ref, merge=True)  # CheckpointError when the run has none
    job = saved.job
    return LoadedRun(job, saved.model.eval(), models.get(job.model.name).loss, int(saved.step or 0))


def sample_request(args: argparse.Namespace) -> SampleRequest:
    """The flags given to `roundhouse sample`, as the task sees them."""
    fields = {k: getattr(args, k) for k in SampleRequest.__dataclass_fields__ if hasattr(args, k)}
    return SampleRequest(**fields)


def check_request(args: argparse.Namespace) -> tuple[Any, SampleRequest]:
    """The run's task and the request, refused from `job.yaml` alone (before the weights are
    read) when the task cannot sample or takes none of a flag given."""
    from roundhouse.trainer.task import build_job_task

    job, _, _ = read_run(args.run)
    task, request = build_job_task(job), sample_request(args)
    task.check_sample(request, job)
    if args.score and task.sample_kind != "images":
        raise JobFileError("--score: only for runs that sample images", "remove --score")
    return task, request


def cmd_sample(args: argparse.Namespace) -> int:
    """Entry point of `roundhouse sample`: asks the run's task (`Task.sample_output`)."""
    task, request = check_request(args)
    run = load_run(args.run)
    result = task.sample_output(run.model, request, run.job)
    if isinstance(result, Tensor):
        path = args.out or "samples.png"
        write_png_grid(result, path)
        print(f"wrote {result.shape[0]} samples ({tuple(result.shape[1:])}) to {path}")
        if args.score:
            print(f"fid {score_images(run, result, args.score):.4f} (classifier {args.score})")
        return 0
    print(result)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as handle:
            handle.write(result)
    return 0


def write_png_grid(images: Tensor, path: str, padding: int = 1) -> None:
    """Tiles `(N, C, H, W)` images in [0, 1] into a square-ish grid and saves it as PNG."""
    from PIL import Image

    n, c, h, w = images.shape
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    grid = torch.zeros(c, rows * (h + padding) + padding, cols * (w + padding) + padding)
    for i in range(n):
        top, left = padding + (i // cols) * (h + padding), padding + (i % cols) * (w + padding)
        grid[:, top : top + h, left : left + w] = images[i].float().cpu()
    pixels = (grid.clamp(0, 1) * 255).round().to(torch.uint8)
    array = pixels[0].numpy() if c == 1 else pixels.permute(1, 2, 0).numpy()
    Image.fromarray(array, mode=None).save(path, format="PNG")


def score_images(run: LoadedRun, images: Tensor, classifier: str) -> float:
    """FID of `images` against the run's test images, in `classifier`'s features."""
    from roundhouse.data import build_splits
    from roundhouse.trainer.fid import load_classifier_features, torchmetrics_fid

    splits = build_splits(run.job.data, seed=run.job.trainer.seed)
    real = splits.test.inputs if hasattr(splits.test, "inputs") else None
    if real is None:
        raise JobFileError("--score needs an in-memory image data set", "drop --score")
    return torchmetrics_fid(load_classifier_features(classifier), real, images.float())
