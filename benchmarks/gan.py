"""DCGAN on the digits: classifier-feature FID of generated images, floor to ceiling.

1. Train a classifier on the digits with roundhouse (`mlp:small`); its last hidden layer is
   the feature space (roundhouse/trainer/fid.py), so no Inception weights are needed.
2. The floor: FID of as many training images as samples against the test images (what real
   digits score). The ceiling: FID of an untrained generator's samples.
3. Train `configs/gan_digits.yaml`'s task and model (through `run_worker`, `--local`; spectral
   norm on the discriminator unless `--batch-norm`; both players at `--lr`; the config's
   generator weight average, `ema_decay`, is what samples), draw `--samples` images, and
   report their FID, the share of the ceiling-to-floor gap they close (target >= 0.8), and the
   classifier's label distribution over them (each digit 5-15%).

    python benchmarks/gan.py [--steps 12000] [--samples 1000] [--image-size 8] [--batch-norm]
        [--set model.options.ema_decay=0 ...]   # job overrides of the GAN run

The digits are 8x8 (16x16 with `--image-size 16`, as the config; four times the work). One
CPU thread: on a shared machine torch's thread pool contends with everyone else.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Any

import torch

from roundhouse.config.loading import apply_overrides, read_yaml, validate_job
from roundhouse.data import build_splits
from roundhouse.trainer import build_local_context, run_worker
from roundhouse.trainer.fid import load_classifier_features, torchmetrics_fid
from roundhouse.trainer.task import build_job_task
from roundhouse.weights.run_folder import prepare_run
from roundhouse.weights.saved_model import load_saved_model

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "gan_digits.yaml"


def train(job: dict[str, Any]) -> str:
    prepared = prepare_run(validate_job(job))
    run_worker(prepared.job, build_local_context("cpu"))
    return prepared.run_dir.url


def common(job: dict[str, Any], storage: str, size: int, steps: int) -> dict[str, Any]:
    job["data"]["image_size"] = size
    job["trainer"].update(max_steps=steps, max_epochs=None, eval_every_steps=None, device="cpu")
    job["trainer"]["checkpoint"] = {"every_epoch": False, "keep_last": 1}
    job["tracking"] = {"wandb": {"mode": "disabled"}, "console": "off"}
    job["storage"] = {"path": storage}
    return job


def classifier_job(storage: str, size: int) -> dict[str, Any]:
    job = {"name": "fid_classifier", "model": {"name": "mlp", "flavor": "small"}}
    job["data"] = {"source": "builtin:digits", "batch_size": 64}
    job["trainer"] = {"optimizer": {"name": "adam", "lr": 0.003}}
    return common(job, storage, size, 600)


def gan_job(
    storage: str, size: int, steps: int, lr: float, sn: bool, overrides: list[str]
) -> dict[str, Any]:
    job = common(read_yaml(str(CONFIG)), storage, size, steps)
    job["model"]["options"]["spectral_norm"] = sn
    for name in ("discriminator", "generator"):
        job["task"]["optimizers"][name]["optimizer"]["lr"] = lr
    return apply_overrides(job, overrides)


def samples_of(run: str, num: int) -> torch.Tensor:
    saved = load_saved_model(run)
    task = build_job_task(saved.job)
    return task.sample(saved.model, num, torch.Generator().manual_seed(1))


def label_shares(features: Any, images: torch.Tensor) -> torch.Tensor:
    """The share of each class among the classifier's predictions for `images`."""
    features(images)
    labels = features.last_logits.argmax(1)
    return torch.bincount(labels, minlength=10).float() / labels.numel()


def format_shares(shares: torch.Tensor) -> str:
    return " ".join(f"{d}:{s:.3f}" for d, s in enumerate(shares.tolist()))


def result(name: str, ours: float, baseline: float, unit: str) -> None:
    ratio = ours / baseline if baseline else float("nan")
    print(f"RESULT {name} ours={ours:.4g} baseline={baseline:.4g} ratio={ratio:.4g} unit={unit}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=12000)
    parser.add_argument("--samples", type=int, default=1000)
    parser.add_argument("--image-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument(
        "--batch-norm", action="store_true", help="batch-norm D instead of spectral norm"
    )
    parser.add_argument(
        "--set", nargs="*", default=[], metavar="KEY=VALUE", help="job overrides of the GAN run"
    )
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as storage:
        clf = train(classifier_job(storage, args.image_size))
        features = load_classifier_features(clf)
        sn = not args.batch_norm
        job = gan_job(storage, args.image_size, args.steps, args.lr, sn, args.set)
        splits = build_splits(validate_job(job).data, seed=0)
        test, pool = splits.test.inputs, splits.train.inputs
        real = pool[torch.randperm(pool.shape[0], generator=torch.Generator().manual_seed(0))]
        floor = torchmetrics_fid(features, test, real[: args.samples])
        untrained = samples_of(
            train({**job, "trainer": {**job["trainer"], "max_steps": 0}}), args.samples
        )
        ceiling = torchmetrics_fid(features, test, untrained)
        fake = samples_of(train(job), args.samples)
        fid = torchmetrics_fid(features, test, fake)
        shares = label_shares(features, fake)
        print("label shares, training images:", format_shares(label_shares(features, real)))
    print("label shares, samples:", format_shares(shares))
    result("gan_fid_trained_vs_untrained", fid, ceiling, "fid")
    result("gan_fid_trained_vs_train_images", fid, floor, "fid")
    closed = (ceiling - fid) / (ceiling - floor)
    result("gan_gap_closed", closed, 0.8, "fraction_of_ceiling_to_floor(target>=0.8)")
    result("gan_label_share_min", float(shares.min()), 0.05, "fraction(target>=0.05)")
    result("gan_label_share_max", float(shares.max()), 0.15, "fraction(target<=0.15)")


if __name__ == "__main__":
    main()
