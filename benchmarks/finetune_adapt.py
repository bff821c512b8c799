"""LoRA, distillation and export (issue 19, parts 3-5), measured end to end on this machine.

    python benchmarks/finetune_adapt.py            # everything (~15-30 min on 2 loaded cores)
    python benchmarks/finetune_adapt.py --only export

Figures (one `RESULT` line each; ratios are what count on a shared machine):

- LoRA: gpt:debug pretrained on one sample of builtin:pytext (seed 0 picks its files), then
  fine-tuned on a held-out sample (seed 1) for the same steps twice: full fine-tuning and LoRA
  rank 8 on the attention's q/v projections. `lora_bytes_exchanged_per_step`: the bytes a ring
  step hands its reducer (every gradient bucket of the trainable parameters, counted on a real
  `OverlappedAllReduce`), LoRA vs full (target <= 1/20). `lora_checkpoint_bytes`: the final
  checkpoint's state.pt (target <= 1/10). `lora_val_loss`: target within 5% of full.
- Distillation: an MLP student (mlp:debug, ~4k parameters) distilled from a trained
  resnet:debug teacher on digits (T=4, alpha=0.9 by default, Hinton's settings) vs the same
  student alone, same steps (target ratio >= 1). Each of `--seeds` trains its own teacher and
  students (the seed also draws the split, so a teacher never saw its students' test samples);
  the figures are means over the seeds. `distill_teacher_agreement`: the student's top-1
  agreement with the teacher on test (baseline: the teacher's own test accuracy).
- Export: the teacher as ONNX; onnxruntime vs PyTorch CPU latency (median ms) at batch 1 and
  64; the int8 file vs the fp32 file (target <= 0.3); int8 vs fp32 test accuracy (drop <= 1
  point).

The fine-tuned runs start from the pretrained weights through `model.init_from` where the job
schema has it (issue 19 part 1); otherwise the benchmark loads them into the built model itself.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import statistics
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from roundhouse.config import ModelConfig
from roundhouse.config.loading import validate_job
from roundhouse.export import ExportOptions, export_model
from roundhouse.export.graph import build_graphs
from roundhouse.export.onnx_file import export_onnx, quantize_int8, run_session, session
from roundhouse.parallel.buckets import OverlappedAllReduce
from roundhouse.trainer import build_local_context, run_worker
from roundhouse.weights import model_build as run_module  # where build_model_for is looked up
from roundhouse.weights.run_folder import prepare_run
from roundhouse.weights.saved_model import load_saved_model

logger = logging.getLogger(__name__)

PYTEXT = {"seq_len": 64, "max_bytes": 150_000}
LORA = {"rank": 8, "alpha": 16.0, "targets": ["blocks.*.attn.q_proj", "blocks.*.attn.v_proj"]}


def result(name: str, ours: float, baseline: float, unit: str) -> None:
    ratio = ours / baseline if baseline else float("nan")
    print(f"RESULT {name} ours={ours:.6g} baseline={baseline:.6g} ratio={ratio:.4f} unit={unit}")


def make_job(name: str, storage: str, model: dict, data: dict, trainer: dict) -> dict[str, Any]:
    return {
        "name": name,
        "model": model,
        "data": data,
        "trainer": {
            "seed": 0,
            "max_epochs": None,
            "device": "cpu",
            "checkpoint": {"every_epoch": False, "keep_last": 1},
            **trainer,
        },
        "tracking": {"wandb": {"mode": "disabled"}, "console": "off"},
        "storage": {"path": storage},
    }


def train(job: dict[str, Any]) -> tuple[dict[str, float], Path]:
    prepared = prepare_run(validate_job(job))
    metrics = run_worker(prepared.job, build_local_context("cpu"))
    return metrics, Path(prepared.run_dir.url)


@contextlib.contextmanager
def starting_from(weights: dict[str, torch.Tensor] | None) -> Iterator[None]:
    """Without `model.init_from` in the schema: load `weights` into every model built."""
    if weights is None:
        yield
        return
    build = run_module.build_model_for

    def build_pretrained(*args: Any, **kwargs: Any) -> torch.nn.Module:
        model = build(*args, **kwargs)
        model.load_state_dict(weights)
        return model

    run_module.build_model_for = build_pretrained
    try:
        yield
    finally:
        run_module.build_model_for = build


def final_state_bytes(run: Path) -> int:
    latest = (run / "checkpoints" / "latest").read_text().strip()
    return (run / "checkpoints" / latest / "state.pt").stat().st_size


def ring_bytes_per_step(run: Path) -> int:
    """Bytes one synchronising backward hands the ring's reducer (all buckets) for `run`."""
    saved = load_saved_model(str(run))
    model = saved.model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    sent: list[int] = []

    def reduce(buffer: torch.Tensor) -> torch.Tensor:
        sent.append(buffer.numel() * buffer.element_size())
        return buffer

    comm = OverlappedAllReduce(params, reduce, bucket_mb=25.0)
    batch = next(iter(saved.splits.eval_loader("val", batch_size=8, rank=0, world_size=1)))
    comm.begin()
    logits = model(batch["input"])
    torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch["target"].flatten()).backward()
    comm.flush()
    comm.wait()
    comm.close()
    return sum(sent)


def bench_lora(storage: str, steps: int, pretrain_steps: int) -> None:
    trainer = {"log_every_steps": 25, "optimizer": {"name": "adamw", "lr": 0.003}}
    data = {"source": "builtin:pytext", "options": PYTEXT, "batch_size": 32}
    base = make_job("pretrain", storage, {"name": "gpt", "flavor": "debug"}, data, trainer)
    base["trainer"]["max_steps"] = pretrain_steps
    _, pretrained = train(base)
    has_init_from = "init_from" in ModelConfig.model_fields
    weights = None if has_init_from else load_saved_model(str(pretrained)).model.state_dict()
    runs = {}
    for name, lora in (("full", None), ("lora", LORA)):
        model: dict[str, Any] = {"name": "gpt", "flavor": "debug", "lora": lora}
        if has_init_from:
            model["init_from"] = str(pretrained)
        job = make_job(name, storage, model, data, {**trainer, "max_steps": steps, "seed": 1})
        with starting_from(weights):
            metrics, run = train(job)
            runs[name] = (metrics, run, ring_bytes_per_step(run))
    (full_m, full_run, full_bytes), (lora_m, lora_run, lora_bytes) = runs["full"], runs["lora"]
    result("lora_bytes_exchanged_per_step", lora_bytes, full_bytes, "bytes")
    result(
        "lora_checkpoint_bytes", final_state_bytes(lora_run), final_state_bytes(full_run), "bytes"
    )
    result("lora_val_loss", lora_m["val/loss"], full_m["val/loss"], "nats/byte")


def distill_seed(storage: str, epochs: int, seed: int, args: argparse.Namespace) -> dict:
    """Teacher, student alone and distilled student, all with `seed` (it also draws the split,
    so each seed's teacher never saw its students' test samples)."""
    data = {"source": "builtin:digits", "batch_size": 64}
    trainer = {"log_every_steps": 50, "optimizer": {"name": "adam", "lr": 0.003}, "seed": seed}
    teacher_job = make_job(f"teacher{seed}", storage, {"name": "resnet"}, data, trainer)
    teacher_job["trainer"].update(max_epochs=args.teacher_epochs, max_steps=None)
    teacher_m, teacher = train(teacher_job)
    student = {"name": "mlp", "flavor": "debug"}
    alone_job = make_job(f"alone{seed}", storage, student, data, {**trainer, "max_epochs": epochs})
    alone_m, _ = train(alone_job)
    distill = {"teacher": str(teacher), "temperature": args.temperature, "alpha": args.alpha}
    student_job = make_job(
        f"distilled{seed}",
        storage,
        student,
        data,
        {**trainer, "max_epochs": epochs, "distill": distill},
    )
    distilled_m, _ = train(student_job)
    figures = {
        "teacher": teacher_m["test/accuracy"],
        "alone": alone_m["test/accuracy"],
        "distilled": distilled_m["test/accuracy"],
        "agreement": distilled_m["test/teacher_agreement"],
    }
    logger.info("distillation seed %d: %s", seed, figures)
    return {"teacher_run": teacher, **figures}


def bench_distill(storage: str, epochs: int, args: argparse.Namespace) -> Path:
    runs = [distill_seed(storage, epochs, seed, args) for seed in args.seeds]

    def mean(key: str) -> float:
        return statistics.mean(r[key] for r in runs)

    result("distill_test_accuracy", mean("distilled"), mean("alone"), "acc")
    result(
        "distill_teacher_agreement",
        mean("agreement"),
        mean("teacher"),
        "agreement (baseline: teacher accuracy)",
    )
    return runs[0]["teacher_run"]


def median_ms(fn: Any, repeats: int) -> float:
    fn()  # warm up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def bench_export(storage: str, teacher: Path | None, epochs: int) -> None:
    if teacher is None:
        data = {"source": "builtin:digits", "batch_size": 64}
        job = make_job("teacher", storage, {"name": "resnet"}, data, {"max_epochs": epochs})
        _, teacher = train(job)
    saved = load_saved_model(str(teacher))
    graph = build_graphs(saved)[0]
    folder = Path(storage) / "export"
    folder.mkdir(exist_ok=True)
    fp32, int8 = str(folder / "m.onnx"), str(folder / "m.int8.onnx")
    export_onnx(graph, fp32, "resnet")
    quantize_int8(fp32, int8)
    sess = session(fp32)
    for batch in (1, 64):
        x = graph.sample(batch, torch.Generator().manual_seed(0))
        with torch.no_grad():
            torch_ms = median_ms(lambda x=x: graph.module(*x), 30)
        ort_ms = median_ms(lambda x=x: run_session(sess, graph.input_names, x), 30)
        result(f"export_latency_batch{batch}", ort_ms, torch_ms, "ms (onnxruntime vs pytorch)")
    result("export_int8_file_bytes", Path(int8).stat().st_size, Path(fp32).stat().st_size, "bytes")
    lines = export_model(saved, ExportOptions("onnx", "int8", False, str(folder / "cli.int8.onnx")))
    accuracy = next(line for line in lines if line.startswith("test accuracy"))
    before, after = (float(part.split()[-1]) for part in accuracy.split("->"))
    result("export_int8_test_accuracy", after, before, "acc")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=("lora", "distill", "export"))
    parser.add_argument("--steps", type=int, default=60, help="fine-tuning steps")
    parser.add_argument("--pretrain-steps", type=int, default=200)
    parser.add_argument("--epochs", type=int, default=10, help="distillation student epochs")
    parser.add_argument("--teacher-epochs", type=int, default=20, help="distillation teacher")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="distillation")
    parser.add_argument("--temperature", type=float, default=4.0, help="distillation T")
    parser.add_argument("--alpha", type=float, default=0.9, help="distillation alpha")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    logger.setLevel(logging.INFO)
    with tempfile.TemporaryDirectory(prefix="rh-adapt-") as storage:
        teacher = None
        if args.only in (None, "lora"):
            bench_lora(storage, args.steps, args.pretrain_steps)
        if args.only in (None, "distill"):
            teacher = bench_distill(storage, args.epochs, args)
        if args.only in (None, "export"):
            bench_export(storage, teacher, args.epochs)


if __name__ == "__main__":
    main()
