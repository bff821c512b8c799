"""A plan as a table (the CLI's output) or as JSON (`--json`)."""

from __future__ import annotations

from typing import Any

from roundhouse.planner.costs import Row
from roundhouse.planner.plan import GB, Plan

HEADER = (
    f"{'#':>3} {'workers':>7} {'strategy':<22} {'micro':>6} {'accum':>5} "
    f"{'params':>8} {'grads':>8} {'optim':>8} {'activ':>8} {'buffers':>8} {'total GB':>9} "
    f"{'fits':>4} {'compute s':>10} {'comm s':>9} {'step s':>9} {'samples/s':>10}"
)


def _gb(value: float) -> str:
    return f"{value / GB:.3f}" if value < 10 * GB else f"{value / GB:.1f}"


def format_row(index: int, row: Row, plan: Plan) -> str:
    """One table line of the plan: strategy, memory breakdown, step time and fit."""
    m = row.memory
    return (
        f"{index:>3} {row.candidate.workers:>7} {row.candidate.label:<22} "
        f"{row.micro_batch:>6g} {plan.shape.grad_accum_steps:>5} "
        f"{_gb(m.params):>8} {_gb(m.grads):>8} {_gb(m.optimizer):>8} {_gb(m.activations):>8} "
        f"{_gb(m.buffers):>8} {_gb(m.total):>9} {'yes' if row.fits else 'NO':>4} "
        f"{row.compute_s:>10.4g} {row.comm_s:>9.3g} {row.step_s:>9.4g} "
        f"{row.samples_per_s(plan.shape.global_batch):>10.1f}"
    )


def format_plan(plan: Plan, limit: int | None = None) -> list[str]:
    """Header lines, one line per row (best first) and the recommendation."""
    p = plan.profile
    job = plan.job
    lines = [
        f"plan for {job.model.name}:{job.model.flavor} ({p.num_params:,} parameters, "
        f"{p.step_flops / 1e9:,.2f} GFLOP per sample per step, activations "
        f"{p.saved_bytes / 1e6:,.2f} MB per sample fp32) on {plan.target.device} "
        f"({plan.target.memory_bytes / GB:.0f} GB per worker), global batch "
        f"{plan.shape.global_batch}",
        f"link: {plan.target.link.bytes_per_s / GB:.2f} GB/s, "
        f"{plan.target.link.latency_s * 1e6:.0f} us per collective step; memory per rank in GB",
        HEADER,
    ]
    rows = plan.rows if limit is None else plan.rows[:limit]
    lines += [format_row(i + 1, row, plan) for i, row in enumerate(rows)]
    if limit is not None and len(plan.rows) > limit:
        lines.append(f"    ... {len(plan.rows) - limit} more row(s) (--all shows them)")
    prefix = "recommended: " if plan.fits else "does not fit: "
    lines.append(prefix + plan.reason)
    return lines


def row_json(row: Row, plan: Plan) -> dict[str, Any]:
    """One row of the plan as a JSON-ready dict."""
    return {
        "workers": row.candidate.workers,
        "label": row.candidate.label,
        "strategy": row.candidate.strategy,
        "data_parallel": row.candidate.data_parallel,
        "micro_batch": row.micro_batch,
        "grad_accum_steps": plan.shape.grad_accum_steps,
        "memory_bytes": row.memory.as_dict(),
        "fits": row.fits,
        "compute_s": row.compute_s,
        "comm_s": row.comm_s,
        "step_s": row.step_s,
        "samples_per_s": row.samples_per_s(plan.shape.global_batch),
    }


def plan_json(plan: Plan) -> dict[str, Any]:
    """Everything in the table, machine-readable."""
    p = plan.profile
    return {
        "model": f"{plan.job.model.name}:{plan.job.model.flavor}",
        "num_params": p.num_params,
        "step_flops_per_sample": p.step_flops,
        "activation_bytes_per_sample": p.saved_bytes,
        "device": plan.target.device,
        "device_memory_bytes": plan.target.memory_bytes,
        "link": {
            "bytes_per_s": plan.target.link.bytes_per_s,
            "latency_s": plan.target.link.latency_s,
        },
        "global_batch": plan.shape.global_batch,
        "fits": plan.fits,
        "recommended": row_json(plan.best, plan) if plan.fits else None,
        "reason": plan.reason,
        "rows": [row_json(r, plan) for r in plan.rows],
    }
