"""`roundhouse sample RUN`: images from a diffusion or VAE run, text from a language-model run.

    roundhouse sample RUN [--sampler ddpm|ddim] [--steps 50] [--eta 0] [--guidance 3.0]
                          [--class 7] [--num 64] [--out grid.png] [--seed 0]
    roundhouse sample RUN --prompt "def " [--max-new-tokens 200] [--temperature 0.8] [--top-k 40]

RUN is a run folder (its latest checkpoint) or one of its `checkpoints/step_<N>` folders, on any
fsspec URL. The run's `job.yaml` rebuilds the model; the checkpoint is read with
`torch.load(weights_only=True)` after its sha256 is checked. Image models write a PNG grid
(`--class` fixes the class of a class-conditional model; otherwise rows cycle through the
classes). Language models print the prompt and its continuation (temperature 0 is greedy).
Flags of the other kind of model are an error, not silently ignored.
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

logger = logging.getLogger(__name__)

IMAGE_FLAGS = {
    "sampler": "--sampler",
    "steps": "--steps",
    "eta": "--eta",
    "guidance": "--guidance",
    "class_label": "--class",
    "num": "--num",
}
TEXT_FLAGS = {
    "prompt": "--prompt",
    "max_new_tokens": "--max-new-tokens",
    "temperature": "--temperature",
    "top_k": "--top-k",
}
BEAM_FLAG = {"beam": "--beam"}  # seq2seq only
IMAGE_TASKS = ("diffusion", "vae")
TASK_SAMPLES = "task"  # the job's task samples (`Task.sample`)
TEXT_TASKS = ("language_model",)


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


def reject_flags(args: argparse.Namespace, flags: dict[str, str], kind: str, allow=()) -> None:
    """A one-line error for flags given that do not apply to this kind of model."""
    given = [flag for attr, flag in flags.items() if getattr(args, attr) is not None]
    given = [flag for flag in given if flag not in allow]
    if given:
        raise JobFileError(f"{', '.join(given)}: not for {kind}", f"remove {', '.join(given)}")


def check_flags(args: argparse.Namespace) -> str:
    """Rejects flags of the other kind of model from `job.yaml` alone; returns the task."""
    from roundhouse.trainer.task import task_name

    job, _, _ = read_run(args.run)
    name, task = f"{job.model.name}:{job.model.flavor}", task_name(job)
    if task in IMAGE_TASKS:
        text_condition = job.model.options.get("condition", "class") == "text"
        reject_flags(
            args, TEXT_FLAGS | BEAM_FLAG, f"image model {name}", ("--prompt",) * text_condition
        )
    elif task in TEXT_TASKS:
        reject_flags(args, IMAGE_FLAGS | BEAM_FLAG, f"language model {name}")
    elif task == "seq2seq":
        from roundhouse.launch.seq2seq_sample import reject_other_flags

        reject_other_flags(args, IMAGE_FLAGS | TEXT_FLAGS, name)
    elif task_can_sample(job):  # any other task that samples images itself (a GAN)
        flags = {k: v for k, v in IMAGE_FLAGS.items() if k != "num"}
        reject_flags(args, {**flags, **TEXT_FLAGS}, f"model {name} ({task})")
        return TASK_SAMPLES
    else:
        raise JobFileError(
            f"model {name} ({task}) cannot sample",
            "sample from a diffusion (ddpm, ldm, dit), vae or language-model run",
        )
    return task


def cmd_sample(args: argparse.Namespace) -> int:
    """Entry point of `roundhouse sample`."""
    task = check_flags(args)  # before the (slower) model and data loading
    run = load_run(args.run)
    if task in (*IMAGE_TASKS, TASK_SAMPLES):
        path = args.out or "samples.png"
        images = task_images(run, args) if task == TASK_SAMPLES else sample_images(run.model, args)
        write_png_grid(images, path)
        print(f"wrote {images.shape[0]} samples ({tuple(images.shape[1:])}) to {path}")
        if args.score:
            print(f"fid {score_images(run, images, args.score):.4f} (classifier {args.score})")
        return 0
    if task == "seq2seq":
        from roundhouse.launch.seq2seq_sample import sample_seq2seq

        options = dict(run.job.data.options)
        src_len = int(options.get("src_len", 64))
        text = sample_seq2seq(run.model, args, src_len, options, run.job.data.source)
    else:
        text = sample_text(run.model, args)
    print(text)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as handle:
            handle.write(text)
    return 0


def sample_conditions(model: Any, args: argparse.Namespace, num: int) -> Tensor | None:
    """The condition of each sample: `--class`, `--prompt`, or the classes in turn."""
    from roundhouse.models.diffusion.conditioning import class_caption, encode_captions

    kind, num_classes = model.condition, model.cond_encoder.num_classes
    if kind == "none":
        if args.class_label is not None:
            raise JobFileError("--class given, but the model is unconditional", "remove --class")
        return None
    if args.class_label is not None and not 0 <= args.class_label < num_classes:
        raise JobFileError(
            f"--class {args.class_label} is not a class of this model",
            f"pick 0..{num_classes - 1}",
        )
    per_row = math.ceil(math.sqrt(num))
    labels = [
        args.class_label if args.class_label is not None else (i // per_row) % num_classes
        for i in range(num)
    ]
    if kind == "class":
        return torch.tensor(labels, dtype=torch.long)
    texts = [args.prompt if args.prompt is not None else class_caption(y) for y in labels]
    return encode_captions(texts, 16)


def sample_images(model: torch.nn.Module, args: argparse.Namespace) -> Tensor:
    """`(N, C, H, W)` images in [0, 1] from a diffusion model or a VAE's decoder."""
    from roundhouse.models.diffusion import DiffusionModel, SamplerConfig

    num = args.num if args.num is not None else 64
    if num < 1:
        raise JobFileError(f"--num {num} must be >= 1", "e.g. --num 64")
    generator = torch.Generator().manual_seed(args.seed)
    if not isinstance(model, DiffusionModel):
        reject_flags(
            args,
            {k: IMAGE_FLAGS[k] for k in ("sampler", "steps", "eta", "guidance", "class_label")},
            "a VAE",
        )
        return model.sample(num, generator=generator)
    config = SamplerConfig(
        sampler=args.sampler or "ddim",
        num_steps=args.steps if args.steps is not None else 50,
        eta=args.eta if args.eta is not None else 0.0,
        guidance=args.guidance if args.guidance is not None else 3.0,
    )
    cond = sample_conditions(model, args, num)
    return model.sample(num, config, cond, generator)


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


def sample_text(model: torch.nn.Module, args: argparse.Namespace) -> str:
    """The prompt and its continuation, decoded from bytes."""
    from roundhouse.data.text import EOS_ID, decode, encode
    from roundhouse.models.gpt import GPT, pick_next_token

    prompt = args.prompt if args.prompt is not None else ""
    max_new = args.max_new_tokens if args.max_new_tokens is not None else 200
    temperature = args.temperature if args.temperature is not None else 0.8
    if max_new < 0 or temperature < 0 or (args.top_k is not None and args.top_k < 1):
        raise JobFileError(
            "--max-new-tokens and --temperature must be >= 0, --top-k >= 1", "fix the flag"
        )
    # Training streams separate files with EOS, so EOS + prompt reads as the start of a file.
    ids = torch.tensor([[EOS_ID, *encode(prompt)]], dtype=torch.long)
    generator = torch.Generator().manual_seed(args.seed)
    if isinstance(model, GPT):
        out = model.generate(
            ids, max_new, temperature=temperature, top_k=args.top_k, generator=generator
        )
    else:  # any (B, T) -> (B, T, V) model: re-run the whole sequence each step
        out = ids
        with torch.no_grad():
            for _ in range(max_new):
                logits = model(out)[:, -1]
                out = torch.cat(
                    [out, pick_next_token(logits, temperature, args.top_k, generator)], dim=1
                )
    return decode(out[0])


def task_can_sample(job: Any) -> bool:
    """Whether the job's task draws samples itself (`Task.can_sample`)."""
    from roundhouse.trainer.task import build_job_task

    return build_job_task(job).can_sample


def task_images(run: LoadedRun, args: argparse.Namespace) -> Tensor:
    """`--num` images from the run's task (`Task.sample`)."""
    from roundhouse.trainer.task import build_job_task

    num = args.num if args.num is not None else 64
    if num < 1:
        raise JobFileError(f"--num {num} must be >= 1", "e.g. --num 64")
    generator = torch.Generator().manual_seed(args.seed)
    return build_job_task(run.job).sample(run.model, num, generator)


def score_images(run: LoadedRun, images: Tensor, classifier: str) -> float:
    """FID of `images` against the run's test images, in `classifier`'s features."""
    from roundhouse.data import build_splits
    from roundhouse.trainer.fid import load_classifier_features, torchmetrics_fid

    splits = build_splits(run.job.data, seed=run.job.trainer.seed)
    real = splits.test.inputs if hasattr(splits.test, "inputs") else None
    if real is None:
        raise JobFileError("--score needs an in-memory image data set", "drop --score")
    return torchmetrics_fid(load_classifier_features(classifier), real, images.float())
