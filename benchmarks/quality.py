"""Quality targets of the model zoo (issue 8), trained and measured end to end on this machine.

    python benchmarks/quality.py                       # everything, full budgets (~60+ min)
    python benchmarks/quality.py --quick               # a shortened smoke run (~5-10 min)
    python benchmarks/quality.py --only ldm --minutes 10

Figures (one `RESULT` line each; measure honestly, report either way):

- `gpt_val_loss`: a byte-level GPT on builtin:pytext, trained for `--minutes` (default 15)
  through the real loop; validation loss in nats per byte against the 2.0 target.
- `moe_vs_dense_val_loss`: an MoE GPT with the same active parameters per token (same width and
  depth, top-1 routing over experts as large as the dense MLP) at the GPT's number of steps.
- `lstm_vs_gpt_val_loss`: a byte LSTM LM trained for the GPT's wall-clock time.
- `ldm_guided_accuracy` / `ldm_guided_vs_unguided_accuracy`: class-conditional latent diffusion
  on digits (16x16): VAE (stage 1), then the UNet on its latents (stage 2); a LeNet trained on
  digits classifies DDIM-50 samples drawn with guidance 3 and with guidance 1 (no guidance).

Step counts that fill a time budget come from a 20-step calibration run of the same job.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from roundhouse import models
from roundhouse.config.loading import validate_job
from roundhouse.launch.cli_sample import load_run
from roundhouse.models.diffusion import SamplerConfig
from roundhouse.trainer import build_local_context, run_worker
from roundhouse.weights.run_folder import prepare_run

logger = logging.getLogger(__name__)


def make_job(name: str, storage: str, model: dict, data: dict, trainer: dict) -> dict[str, Any]:
    return {
        "name": name,
        "model": model,
        "data": data,
        "trainer": {
            "seed": 0,
            "max_epochs": None,  # the budgets below are in steps
            "checkpoint": {"every_epoch": False, "keep_last": 1},
            **trainer,
        },
        "tracking": {"wandb": {"mode": "disabled"}, "console": "off"},
        "storage": {"path": storage},
    }


def train(job: dict[str, Any]) -> tuple[dict[str, float], Path, float, list[dict]]:
    """Trains `job` with the real loop; returns final metrics, run folder, seconds, rows.

    The seconds run from the start of `run_worker` (data and model setup included) to the last
    logged training step, so the final validation/test evaluation is not counted.
    """
    prepared = prepare_run(validate_job(job))
    start = time.time()
    metrics = run_worker(prepared.job, build_local_context("cpu"))
    run = Path(prepared.run_dir.url)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").open()]
    seconds = max(r["time"] for r in rows if "train/loss" in r) - start
    return metrics, run, seconds, rows


def seconds_per_step(job: dict[str, Any]) -> float:
    """Median step time of a 20-step run of `job` (from the loop's own samples/s windows)."""
    probe = json.loads(json.dumps(job))
    probe["name"] += "_calibration"
    probe["trainer"] |= {"max_steps": 20, "log_every_steps": 5, "eval_every_steps": None}
    probe["trainer"].pop("max_epochs", None)
    _, _, _, rows = train(probe)
    rates = [r["train/samples_per_s"] for r in rows if "train/samples_per_s" in r][1:]
    return job["data"]["batch_size"] / statistics.median(rates)


MAX_BYTES = {"full": 8_000_000, "quick": 1_000_000}
CORPUS = {"max_bytes": MAX_BYTES["full"]}


def text_job(storage: str, name: str, model: dict, steps: int, lr: float) -> dict[str, Any]:
    data = {
        "source": "builtin:pytext",
        "batch_size": 32,
        "eval_batch_size": 256,
        "options": {"seq_len": 128, "max_bytes": CORPUS["max_bytes"]},
    }
    trainer = {
        "max_steps": steps,
        "eval_every_steps": steps,
        "log_every_steps": 5,
        "grad_clip_norm": 1.0,
        "optimizer": {"name": "adamw", "lr": lr},
        "scheduler": {"name": "cosine", "warmup_steps": min(100, steps // 10)},
    }
    return make_job(name, storage, model, data, trainer)


def result(name: str, ours: float, baseline: float, unit: str) -> None:
    ratio = ours / baseline if baseline else float("nan")
    print(
        f"RESULT {name} ours={ours:.4f} baseline={baseline:.4f} ratio={ratio:.3f} unit={unit}",
        flush=True,
    )


def language_models(storage: str, minutes: float, flavor: str, only: set[str]) -> None:
    gpt = {"name": "gpt", "flavor": flavor}
    step_s = seconds_per_step(text_job(storage, "gpt", gpt, 20, 3e-3))
    steps = max(20, int(minutes * 60 / step_s))
    print(f"gpt:{flavor}: {step_s:.3f} s/step -> {steps} steps in {minutes:g} min", flush=True)
    metrics, _, seconds, _ = train(text_job(storage, "gpt", gpt, steps, 3e-3))
    gpt_loss = metrics["val/loss"]
    result("gpt_val_loss", gpt_loss, 2.0, "nats/byte")
    result("gpt_train_minutes", seconds / 60, minutes, "min")
    if "moe" in only:
        # The GPT's width, depth and heads; top-1 routing to experts the size of its MLP.
        layout = dict(models.get("gpt").flavors[flavor])
        moe = {
            "name": "moe",
            "flavor": "debug",
            "options": {**layout, "num_experts": 4, "top_k": 1},
        }
        moe_metrics, _, _, _ = train(text_job(storage, "moe", moe, steps, 3e-3))
        result("moe_vs_dense_val_loss", moe_metrics["val/loss"], gpt_loss, "nats/byte")
    if "lstm" in only:
        lstm = {"name": "lstm_lm", "flavor": "small"}
        lstm_steps = max(
            20, int(seconds / seconds_per_step(text_job(storage, "lstm", lstm, 20, 2e-3)))
        )
        lstm_metrics, _, lstm_s, _ = train(text_job(storage, "lstm", lstm, lstm_steps, 2e-3))
        print(f"lstm_lm:small: {lstm_steps} steps in {lstm_s / 60:.1f} min", flush=True)
        result("lstm_vs_gpt_val_loss", lstm_metrics["val/loss"], gpt_loss, "nats/byte")


def digits_job(storage: str, name: str, model: dict, steps: int, lr: float) -> dict[str, Any]:
    data = {"source": "builtin:digits", "image_size": 16, "batch_size": 64}
    trainer = {
        "max_steps": steps,
        "eval_every_steps": steps,
        "log_every_steps": 50,
        "grad_clip_norm": 1.0,
        "optimizer": {"name": "adamw", "lr": lr},
        "scheduler": {"name": "cosine", "warmup_steps": min(100, steps // 10)},
    }
    return make_job(name, storage, model, data, trainer)


@torch.no_grad()
def guided_accuracy(ldm: Any, classifier: Any, per_class: int, guidance: float) -> float:
    """Share of DDIM-50 samples the classifier assigns to the class they were asked for."""
    labels = torch.arange(10).repeat_interleave(per_class)
    config = SamplerConfig(sampler="ddim", num_steps=50, guidance=guidance)
    images = ldm.sample(len(labels), config, labels, torch.Generator().manual_seed(0))
    predicted = classifier(images).argmax(dim=1)
    return float((predicted == labels).float().mean())


def latent_diffusion(storage: str, vae_steps: int, ldm_steps: int, per_class: int) -> None:
    lenet = {"name": "lenet", "flavor": "debug"}
    lenet_metrics, lenet_run, _, _ = train(digits_job(storage, "lenet", lenet, 1000, 3e-3))
    print(f"lenet test accuracy on real digits: {lenet_metrics['test/accuracy']:.4f}", flush=True)
    vae = {"name": "vae", "flavor": "small"}
    vae_metrics, vae_run, vae_s, _ = train(digits_job(storage, "vae", vae, vae_steps, 2e-3))
    print(
        f"vae: {vae_steps} steps, {vae_s / 60:.1f} min, val psnr {vae_metrics['val/psnr']:.2f} dB",
        flush=True,
    )
    ldm = {
        "name": "ldm",
        "flavor": "small",
        "options": {"vae_checkpoint": str(vae_run), "condition": "class", "p_uncond": 0.1},
    }
    _, ldm_run, ldm_s, _ = train(digits_job(storage, "ldm", ldm, ldm_steps, 1e-3))
    print(f"ldm: {ldm_steps} steps, {ldm_s / 60:.1f} min", flush=True)
    classifier, model = load_run(str(lenet_run)).model, load_run(str(ldm_run)).model
    guided = guided_accuracy(model, classifier, per_class, 3.0)
    unguided = guided_accuracy(model, classifier, per_class, 1.0)
    result("ldm_guided_accuracy", guided, 0.8, "fraction")
    result("ldm_guided_vs_unguided_accuracy", guided, unguided, "fraction")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=15.0, help="GPT training budget")
    parser.add_argument("--quick", action="store_true", help="shortened smoke run")
    parser.add_argument("--gpt-flavor", default="tiny")
    parser.add_argument("--only", default="gpt,moe,lstm,ldm", help="comma-separated parts")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    only = set(args.only.split(","))
    minutes = 1.0 if args.quick and args.minutes == 15.0 else args.minutes
    CORPUS["max_bytes"] = MAX_BYTES["quick" if args.quick else "full"]
    with tempfile.TemporaryDirectory() as storage:
        if only & {"gpt", "moe", "lstm"}:
            language_models(storage, minutes, args.gpt_flavor, only)
        if "ldm" in only:
            steps = (100, 150, 2) if args.quick else (1500, 4000, 50)
            latent_diffusion(storage, *steps)


if __name__ == "__main__":
    main()
