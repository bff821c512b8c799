"""Starting from weights: what fine-tuning buys over training from scratch.

Transfer (issue 19): `resnet:debug` is pretrained on the digits 0-4 (all of their samples).
Then a 5-way classifier of the digits 5-9 is trained from only 20 labelled samples per class:

- ours: `model.init_from` the pretrained run, `model.init_skip: [fc.*]` (a new head),
  `trainer.freeze` on the whole backbone — only the head trains;
- baseline: the same model, samples, steps and optimizer, from random weights.

Both go through the real job path (`train_local`: job validation, `init_from`, freezing, the
training loop, the test evaluation) on in-process data sources registered by this script. The
figure is the test accuracy on every other sample of the digits 5-9, mean over `--seeds`
(each seed draws other labelled samples and another initialisation; one pretraining).

Why the >= 1.2 target is out of reach here (measured, seeds 0-2, 60 steps): the pretrained
backbone is good at its own task (test accuracy 1.000 on the digits 0-4), but the model
trained from scratch already reaches 0.96-0.98 on the digits 5-9 from 100 labelled samples,
so a ratio of 1.2 would need an accuracy above 1. A new linear head on the frozen 64 features
reaches 0.85-0.89 even trained to convergence (2000 full-batch steps, outside the job path):
features learnt to tell 0-4 apart carry less about 5-9 than a network fitted to them directly,
and no more than a frozen random backbone's (the second RESULT line: ratio 0.95 at 60 and at
300 steps).
Keeping the frozen BatchNorm layers in eval mode during fine-tuning (their running statistics
untouched) changed the figure by less than the seed-to-seed spread.

    python benchmarks/finetune.py [--seeds 0 1 2] [--pretrain-epochs 15] [--steps 60]

Ends with `RESULT finetune_transfer_accuracy ours=<acc> baseline=<acc> ratio=... unit=accuracy`
(target: ratio >= 1.2; a second line compares with the same frozen recipe on random weights).
Each section is one function returning its RESULT lines, so other
sections (LoRA, distillation, export) can be added beside `transfer()`.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import tempfile
from pathlib import Path
from typing import Any

import torch

from roundhouse.config.loading import validate_job
from roundhouse.data import sources
from roundhouse.launch.local import train_local

logger = logging.getLogger("finetune")

PRETRAIN_CLASSES = (0, 1, 2, 3, 4)
TARGET_CLASSES = (5, 6, 7, 8, 9)
BACKBONE = ["conv1.*", "bn1.*", "layer*"]  # resnet:debug's everything-but-`fc`


def digits_by_class(classes: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """The digits of `classes`, labels renumbered 0..len(classes)-1."""
    images, labels = sources._digits_arrays()
    inputs = torch.as_tensor(images, dtype=torch.float32).unsqueeze(1) / 16.0
    targets = torch.as_tensor(labels, dtype=torch.int64)
    keep = torch.isin(targets, torch.tensor(classes))
    remap = {c: i for i, c in enumerate(classes)}
    return inputs[keep], torch.tensor([remap[int(t)] for t in targets[keep]])


def few_shot_split(per_class: int, seed: int) -> sources._Loaded:
    """Train: `per_class` samples of each target class; val = test: all the others."""
    inputs, targets = digits_by_class(TARGET_CLASSES)
    order = torch.randperm(len(targets), generator=torch.Generator().manual_seed(seed))
    chosen = torch.cat([order[targets[order] == c][:per_class] for c in range(5)])
    rest = order[~torch.isin(order, chosen)]
    parts = [chosen, rest, rest]
    return sources._Loaded(
        torch.cat([inputs[p] for p in parts]),
        torch.cat([targets[p] for p in parts]),
        num_classes=len(TARGET_CLASSES),
        split_sizes=tuple(len(p) for p in parts),  # type: ignore[arg-type]
    )


def register_sources(per_class: int, seed: int) -> None:
    """`bench:digits_0_4` (all samples, the run's own split) and `bench:digits_5_9_few`."""

    def pretrain(options: dict[str, Any]) -> sources._Loaded:
        inputs, targets = digits_by_class(PRETRAIN_CLASSES)
        return sources._Loaded(inputs, targets, num_classes=len(PRETRAIN_CLASSES))

    def few(options: dict[str, Any], split: Any, run_seed: int) -> sources._Loaded:
        return few_shot_split(per_class, seed)

    few.splits_itself = True  # type: ignore[attr-defined]
    sources.SOURCES["bench:digits_0_4"] = pretrain
    sources.SOURCES["bench:digits_5_9_few"] = few


def job(name: str, storage: Path, source: str, seed: int, **trainer: Any) -> dict[str, Any]:
    return {
        "name": name,
        "model": {"name": "resnet", "flavor": "debug"},
        "data": {"source": source, "batch_size": 50},
        "trainer": {
            "seed": seed,
            "device": "cpu",
            "optimizer": {"name": "adam", "lr": 0.01},
            "checkpoint": {"every_epoch": False, "keep_last": 1},
            **trainer,
        },
        "strategy": {"kind": "single"},
        "tracking": {"wandb": {"mode": "disabled"}, "console": "off"},
        "storage": {"path": str(storage)},
    }


def run(spec: dict[str, Any]) -> dict[str, float]:
    return train_local(validate_job(spec))


def few_shot(storage: Path, name: str, seed: int, steps: int, **model: Any) -> float:
    """Test accuracy of a run on the few labelled digits 5-9 (`model` adds init_from etc.)."""
    spec = job(name, storage, "bench:digits_5_9_few", seed, max_steps=steps, max_epochs=None)
    spec["model"].update(model)
    if "init_from" in model or model.get("frozen"):
        spec["model"].pop("frozen", None)
        spec["trainer"]["freeze"] = BACKBONE
    return run(spec)["test/accuracy"]


def transfer(args: argparse.Namespace, storage: Path) -> list[str]:
    """Fine-tuned head on a pretrained backbone vs the same model from scratch.

    The backbone is pretrained once; each seed draws other labelled samples and another head
    (and scratch) initialisation. Two baselines: the model trained from scratch (all layers,
    the issue's target), and the same frozen-backbone recipe on random weights (what the
    pretrained weights themselves add).
    """
    register_sources(args.per_class, args.seeds[0])
    spec = job("pretrain", storage, "bench:digits_0_4", 0, max_epochs=args.pretrain_epochs)
    pre = run(spec)
    (source,) = sorted((storage / "pretrain").iterdir())
    logger.info("pretrained on 0-4: test accuracy %.3f", pre["test/accuracy"])
    tuned, scratch, random_backbone = [], [], []
    for seed in args.seeds:
        register_sources(args.per_class, seed)
        tuned.append(
            few_shot(storage, "tuned", seed, args.steps, init_from=str(source), init_skip=["fc.*"])
        )
        scratch.append(few_shot(storage, "scratch", seed, args.steps))
        random_backbone.append(few_shot(storage, "random", seed, args.steps, frozen=True))
        logger.info(
            "seed %d: fine-tuned %.3f, scratch %.3f, frozen random backbone %.3f",
            seed,
            tuned[-1],
            scratch[-1],
            random_backbone[-1],
        )
    ours = statistics.mean(tuned)
    lines = []
    for name, values in (("accuracy", scratch), ("vs_random_backbone", random_backbone)):
        theirs = statistics.mean(values)
        lines.append(
            f"RESULT finetune_transfer_{name} ours={ours:.4f} baseline={theirs:.4f} "
            f"ratio={ours / theirs:.3f} unit=accuracy"
        )
    return lines


SECTIONS = {"transfer": transfer}  # name -> function(args, storage) -> RESULT lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--pretrain-epochs", type=int, default=10)
    parser.add_argument("--steps", type=int, default=60, help="fine-tuning optimizer steps")
    parser.add_argument("--per-class", type=int, default=20, help="labelled samples per class")
    parser.add_argument("--sections", nargs="+", default=list(SECTIONS), choices=list(SECTIONS))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    for noisy in ("roundhouse",):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    lines: list[str] = []
    with tempfile.TemporaryDirectory(prefix="rh-finetune-") as folder:
        for name in args.sections:
            lines += SECTIONS[name](args, Path(folder))
    for line in lines:
        print(line)


if __name__ == "__main__":
    main()
