"""The one pre-flight: every check a job must pass before a command starts anything.

`train` (local, Ray, `--folds`), `submit`, `tune`, `plan` and `--dry-run` all call
`preflight(job, world_size)`. It builds the data info, the meta-device model and the layout
once (`checks.JobUnderCheck`) and runs the registered checks (`checks.CHECKS`) in order: names,
world size, layout, the strategy's own `check_job`, batch arithmetic, task, shapes, fine-tune
(`init_from`, `freeze`, `param_groups`), LoRA and distillation. The first failure is the
one-line `RoundhouseError` the CLI prints; `--dry-run` prints the report.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field

from roundhouse.config import JobSpec
from roundhouse.config.topology import Topology
from roundhouse.trainer.checks import CHECKS, STRATEGY_CHECKS, JobUnderCheck

logger = logging.getLogger(__name__)

__all__ = ["STRATEGY_CHECKS", "Report", "preflight"]


@dataclass
class Report:
    """What the pre-flight found: the checks that ran, the layout and the report lines."""

    job: JobSpec
    world_size: int
    checks: list[str] = field(default_factory=list)
    lines: list[str] = field(default_factory=list)
    topology: Topology | None = None

    def text(self) -> str:
        """The report as `--dry-run` prints it, one finding per line."""
        return "\n".join(self.lines)


def preflight(job: JobSpec, world_size: int | None = None, *, skip: Iterable[str] = ()) -> Report:
    """Run every registered check on `job` for `world_size` workers.

    Args:
        job: the validated job (a concrete strategy unless its checks are skipped).
        world_size: the number of workers it will run on (default `cluster.num_workers`; 1
            for `--local`).
        skip: names of checks not to run (`STRATEGY_CHECKS` where the strategy is chosen
            later or per row).

    Raises:
        RoundhouseError: the first check that fails, as a one-line error.
    """
    skip = set(skip)
    unknown = skip - CHECKS.keys()
    if unknown:
        raise ValueError(f"unknown pre-flight check(s) {sorted(unknown)}; valid: {list(CHECKS)}")
    world_size = job.cluster.num_workers if world_size is None else world_size
    subject = JobUnderCheck(job, world_size)
    report = Report(job, world_size)
    for name, check in CHECKS.items():
        if name in skip:
            continue
        report.lines.extend(check(subject))
        report.checks.append(name)
    report.topology = subject.topology
    logger.debug("pre-flight of %s on %d worker(s): %s", job.name, world_size, report.checks)
    return report
