"""Transfer on language: a BERT pretrained as a masked LM on the standard library's source
fine-tuned on docstring classification with 10% of the labels, against the same model from
scratch (replaces the digits transfer figure of `benchmarks/finetune.py`, which could not pass:
a digits model from scratch is already at 0.97).

1. pretrain: `bert` as a masked LM on `builtin:pytext` (the stdlib's `.py` files, bytes) for
   `--pretrain-steps` steps;
2. fine-tune: `bert_classifier` with `model.init_from` that run (the `[CLS]` pooler and the
   classifier are new heads; no `init_skip`) on `builtin:pydoc-cls` with
   `label_fraction: 0.1` (191 of 1,978 training docstrings, 20 packages);
3. scratch: the same job without `init_from`: same model, data, steps, optimizer and seed.

All three go through the real job path (`train_local`). Both fine-tuning runs evaluate on the
validation split every `--steps / 10` steps; "steps to reach" is the first evaluation at which
the pretrained run's validation accuracy reaches the scratch run's final validation accuracy
(the test split is evaluated once, at the end, as the trainer does). Final figures are test
accuracy and macro-F1.

    python benchmarks/transfer.py [--quick] [--flavor debug] [--pretrain-steps 600] [--steps 300]

RESULT lines: `transfer_steps_to_scratch_accuracy` (pretrained steps to reach scratch's final
val accuracy / all steps; target <= 0.33) and `transfer_test_accuracy` (pretrained vs scratch
final test accuracy; target ratio >= 1.0), plus macro-F1 for information.
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
from pathlib import Path
from typing import Any

import torch

from roundhouse.config.loading import validate_job
from roundhouse.launch.local import train_local

logger = logging.getLogger("transfer")


def job(name: str, model: dict, data: dict, trainer: dict, storage: str) -> Any:
    return validate_job(
        {
            "name": name,
            "model": model,
            "data": {"batch_size": 32, "eval_batch_size": 256, **data},
            "trainer": {
                "max_epochs": 10_000,
                "log_every_steps": 50,
                "optimizer": {"name": "adamw", "lr": 1e-3, "weight_decay": 0.01},
                "scheduler": {"name": "cosine", "warmup_steps": 30},
                "grad_clip_norm": 1.0,
                **trainer,
            },
            "tracking": {"wandb": {"mode": "disabled"}, "console": "off"},
            "storage": {"path": storage},
        }
    )


def only_run(storage: str, name: str) -> Path:
    runs = sorted(p for p in (Path(storage) / name).iterdir() if p.is_dir())
    return runs[-1]


def val_curve(run: Path) -> list[tuple[int, float]]:
    """`(step, val/accuracy)` of every evaluation of a run."""
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [(int(r["step"]), r["val/accuracy"]) for r in rows if "val/accuracy" in r]


def finetune(args: argparse.Namespace, storage: str, name: str, init: str | None) -> dict:
    model = {"name": "bert_classifier", "flavor": args.flavor, "options": {"dropout": 0.1}}
    if init:
        model["init_from"] = init
    data = {
        "source": "builtin:pydoc-cls",
        "options": {"seq_len": args.seq_len, "label_fraction": args.label_fraction},
    }
    every = max(1, args.steps // 10)
    trainer = {"max_steps": args.steps, "eval_every_steps": every, "seed": args.seed}
    summary = train_local(job(name, model, data, trainer, storage))
    return {**summary, "curve": val_curve(only_run(storage, name))}


def pretrain(args: argparse.Namespace, storage: str) -> str:
    model = {"name": "bert", "flavor": args.flavor}
    trainer = {"max_steps": args.pretrain_steps, "eval_every_steps": args.pretrain_steps}
    summary = train_local(
        job("mlm", model, pytext_data(args), {**trainer, "seed": args.seed}, storage)
    )
    logger.info("pretrained: val loss %.3f, accuracy %.3f", summary["val/loss"],
                summary["val/accuracy"])  # fmt: skip
    return str(only_run(storage, "mlm"))


def steps_to_reach(curve: list[tuple[int, float]], target: float) -> int | None:
    return next((step for step, acc in curve if acc >= target), None)


def loss_curve(run: Path) -> list[tuple[int, float]]:
    """`(step, val/loss)` of every evaluation of a run."""
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [(int(r["step"]), r["val/loss"]) for r in rows if "val/loss" in r]


def pytext_data(args: argparse.Namespace) -> dict:
    return {
        "source": "builtin:pytext",
        "options": {"seq_len": args.seq_len, "max_bytes": args.max_bytes},
    }


def lm_pretrain(args: argparse.Namespace, storage: str) -> str:
    """`gpt` trained as a byte LM on the stdlib's source (`builtin:pytext`)."""
    model = {"name": "gpt", "flavor": args.flavor}
    trainer = {"max_steps": args.pretrain_steps, "eval_every_steps": args.pretrain_steps}
    summary = train_local(
        job("lm", model, pytext_data(args), {**trainer, "seed": args.seed}, storage)
    )
    logger.info("LM pretrained: val loss %.3f", summary["val/loss"])
    return str(only_run(storage, "lm"))


def lm_finetune(args: argparse.Namespace, storage: str, name: str, init: str | None) -> dict:
    """`gpt` as a byte LM on 10% of the docstrings (`builtin:pydoc-text`), from `init`."""
    model: dict[str, Any] = {"name": "gpt", "flavor": args.flavor}
    if init:
        model["init_from"] = init
    data = {
        "source": "builtin:pydoc-text",
        "options": {"seq_len": args.seq_len, "fraction": args.label_fraction},
    }
    every = max(1, args.steps // 10)
    trainer = {"max_steps": args.steps, "eval_every_steps": every, "seed": args.seed}
    summary = train_local(job(name, model, data, trainer, storage))
    return {**summary, "curve": loss_curve(only_run(storage, name))}


def seen_in_pretraining(args: argparse.Namespace) -> tuple[int, int]:
    """How many val docstrings of pydoc-text occur in the LM's pretraining text (the stdlib
    files of pytext's train split hold docstrings too), and how many there are."""
    from roundhouse.data.pydoc_corpus import split_of, stdlib_docstrings
    from roundhouse.data.text import select_files, split_by_bytes, stdlib_files

    chosen = select_files(stdlib_files(), args.max_bytes, args.seed)
    train = b"\n".join(split_by_bytes([data for _, data in chosen], (0.8, 0.1, 0.1))[0])
    val = [r.docstring for r in stdlib_docstrings() if split_of(r.key) == 1]
    return sum(doc.splitlines()[0].encode() in train for doc in val), len(val)


def lm_transfer(args: argparse.Namespace) -> None:
    """The LM half: RESULT lines for steps to scratch's final val loss and the final loss."""
    with tempfile.TemporaryDirectory() as storage:
        pretrained = lm_pretrain(args, storage)
        ours = lm_finetune(args, storage, "lm_pretrained", pretrained)
        scratch = lm_finetune(args, storage, "lm_scratch", None)
    logger.info("val loss curves: pretrained %s scratch %s", ours["curve"], scratch["curve"])
    target = scratch["curve"][-1][1]
    reached = next((step for step, loss in ours["curve"] if loss <= target), None)
    fraction = (reached if reached is not None else float("inf")) / args.steps
    seen, num_val = seen_in_pretraining(args)
    print(
        f"RESULT transfer_lm_steps_to_scratch_loss ours={reached} baseline={args.steps} "
        f"ratio={fraction:.2f} unit=steps scratch_val_loss={target:.4f} flavor={args.flavor} "
        f"pretrain_steps={args.pretrain_steps} fraction={args.label_fraction} "
        f"val_docstrings_in_pretraining={seen}/{num_val}",
        flush=True,
    )
    a, b = ours["curve"][-1][1], target
    print(
        f"RESULT transfer_lm_val_loss ours={a:.4f} baseline={b:.4f} ratio={a / b:.2f} "
        f"unit=nats_per_byte test_loss_ours={ours['test/loss']:.4f} "
        f"test_loss_baseline={scratch['test/loss']:.4f}",
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a few minutes on a 2-core CPU")
    parser.add_argument("--flavor", default="debug")
    parser.add_argument("--pretrain-steps", type=int, default=1500)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--max-bytes", type=int, default=4_000_000)
    parser.add_argument("--label-fraction", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--only", choices=("cls", "lm"), help="run one half (default both)")
    args = parser.parse_args()
    if args.quick:
        args.pretrain_steps, args.steps = min(args.pretrain_steps, 600), min(args.steps, 200)
        args.seq_len, args.max_bytes = min(args.seq_len, 64), min(args.max_bytes, 2_000_000)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    torch.set_num_threads(1)
    if args.only != "cls":
        lm_transfer(args)
    if args.only != "lm":
        cls_transfer(args)


def cls_transfer(args: argparse.Namespace) -> None:
    """The classification half: RESULT lines for steps to scratch's accuracy and the final."""
    with tempfile.TemporaryDirectory() as storage:
        mlm = pretrain(args, storage)
        ours = finetune(args, storage, "pretrained", mlm)
        scratch = finetune(args, storage, "scratch", None)
    logger.info("val curves: pretrained %s scratch %s", ours["curve"], scratch["curve"])
    target = scratch["curve"][-1][1]
    reached = steps_to_reach(ours["curve"], target)
    fraction = (reached if reached is not None else float("inf")) / args.steps
    print(
        f"RESULT transfer_steps_to_scratch_accuracy ours={reached} baseline={args.steps} "
        f"ratio={fraction:.2f} unit=steps scratch_val_accuracy={target:.4f} flavor={args.flavor} "
        f"pretrain_steps={args.pretrain_steps} label_fraction={args.label_fraction}",
        flush=True,
    )
    a, b = ours["test/accuracy"], scratch["test/accuracy"]
    print(
        f"RESULT transfer_test_accuracy ours={a:.4f} baseline={b:.4f} ratio={a / max(b, 1e-9):.2f} "
        f"unit=accuracy macro_f1_ours={ours['test/macro_f1']:.4f} "
        f"macro_f1_baseline={scratch['test/macro_f1']:.4f}",
        flush=True,
    )


if __name__ == "__main__":
    main()
