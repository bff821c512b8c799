"""Sweeps on Ray Tune: every trial is a roundhouse training run on its own worker group.

A trial is a Tune function trainable (`run_trial`) that binds the sampled values into the
job, runs it with `workers.train_on_ray` (Ray Train's `TorchTrainer`, `cluster.num_workers`
workers, any strategy) and, while it trains, reports every evaluation row that rank 0 writes
to the run's `metrics.jsonl` to Tune (`tune.report`). So ASHA sees each evaluation, with no
Ray call inside the training loop. Stopping a trial ends its actor, and Ray ends the trial's
worker group with it (they share fate with their owner).

Layout: `<storage>/<name>/tune-<id>/` holds Tune's state (`ray/`), `best.yaml`,
`results.tsv`, and one run folder per trial, `<trial id>/`. A restarted trial (after
`--resume`) continues from its run folder's latest checkpoint instead of from scratch.
SIGTERM to the sweep makes every training trial checkpoint first (`preempt`).
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from roundhouse.cluster.progress import MetricsTail
from roundhouse.cluster.runtime import ClusterError, scoped_env
from roundhouse.cluster.sweep.preempt import SweepPreemption, TrialPreemption
from roundhouse.cluster.sweep.space import apply_params
from roundhouse.config import JobSpec
from roundhouse.config.loading import validate_job
from roundhouse.runs.rundir import run_dir_of

logger = logging.getLogger(__name__)

TUNE_FOLDER = "ray"
# The trial's own actor only waits on its worker group; its workers hold the real resources.
TRIAL_CPUS = 0.01
POLL_S = 1.0
# Trials started beyond those whose worker groups fit: a standby trial's actor and Ray Train
# controller start while the others train, and its worker group (a pending placement group)
# is placed the moment one of them frees its workers. That hides ~10 s of process start-up
# per trial, which dominates short trials (and trials that ASHA stops after an epoch).
STANDBY_TRIALS = 1
# How long a trial's worker group may queue for resources that other trials hold: the whole
# sweep (that the cluster can host a group at all is checked first, `wait_for_capacity`).
TRIAL_QUEUE_TIMEOUT_S = 7 * 24 * 3600.0


@dataclass
class SweepPlan:
    """Everything a sweep needs, decided before Ray starts (see launch/cli_tune.py)."""

    job: JobSpec  # the base job, storage path absolute
    sweep_url: str  # <storage>/<name>/tune-<id>
    sweep_id: str  # tune-<id>
    params: list[Any]  # launch.search_space.SearchParam
    metric: str
    mode: str
    samples: int
    scheduler: str
    searcher: str
    max_t: int  # evaluations a full trial makes (ASHA's horizon)
    grace_period: int = 1
    reduction_factor: int = 3
    verbose: bool = False
    extra: dict[str, Any] = field(default_factory=dict)


def build_domain(param: Any) -> Any:
    """Ray Tune's search domain for one `SearchParam`."""
    from ray import tune

    lo_hi = param.values
    if param.kind == "uniform":
        return tune.uniform(*lo_hi)
    if param.kind == "loguniform":
        return tune.loguniform(*lo_hi)
    if param.kind == "randint":
        return tune.randint(*lo_hi)
    if param.kind == "grid":
        return tune.grid_search(list(param.values))
    return tune.choice(list(param.values))


def build_param_space(plan: SweepPlan) -> dict[str, Any]:
    """Dotted job key -> domain; grid search enumerates `choice(...)` values too."""
    from ray import tune

    space = {}
    for param in plan.params:
        if plan.searcher == "grid" and param.kind == "choice":
            space[param.key] = tune.grid_search(list(param.values))
        else:
            space[param.key] = build_domain(param)
    return space


def build_searcher(plan: SweepPlan) -> Any:
    """Tune's random/grid variant generator (seeded by `trainer.seed`, so a sweep and its
    rerun sample the same trials) or Optuna's Bayesian (TPE) searcher."""
    if plan.searcher != "bayes":
        from ray.tune.search.basic_variant import BasicVariantGenerator

        # Tune ignores `max_concurrent_trials` for a generator passed in: it queues itself.
        return BasicVariantGenerator(
            random_state=plan.job.trainer.seed, max_concurrent=running_trials(plan.job)
        )
    try:
        import optuna  # noqa: F401
        from ray.tune.search.optuna import OptunaSearch
    except ImportError:
        raise ClusterError(
            "--searcher bayes needs optuna, which is not installed",
            "pip install optuna (or roundhouse[bayes])",
        ) from None
    return OptunaSearch(metric=plan.metric, mode=plan.mode, seed=plan.job.trainer.seed)
    # (a `Searcher`: Tune wraps it in a ConcurrencyLimiter of `max_concurrent_trials`)


def build_scheduler(plan: SweepPlan) -> Any:
    """ASHA on the metric every evaluation reports, or FIFO (every trial runs to the end)."""
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    if plan.scheduler == "fifo":
        return FIFOScheduler()
    return ASHAScheduler(
        time_attr="training_iteration",
        max_t=plan.max_t + 1,  # + the last report, which adds the test metrics
        grace_period=min(plan.grace_period, max(plan.max_t, 1)),
        reduction_factor=plan.reduction_factor,
    )


def concurrent_trials(job: JobSpec) -> int:
    """How many trials' worker groups fit in the cluster at once (at least 1): the rest queue."""
    import ray

    from roundhouse.cluster.capacity import worker_resources
    from roundhouse.cluster.services import service_cpus

    total = ray.cluster_resources()
    need = {k: v * job.cluster.num_workers for k, v in worker_resources(job.cluster).items()}
    need["CPU"] = need.get("CPU", 0.0) + service_cpus(job)
    fits = [
        math.floor((total.get(k, 0.0) - (1.0 if k == "CPU" else 0.0)) / v + 1e-9)
        for k, v in need.items()
        if v > 0
    ]
    return max(1, min(fits, default=1))


def running_trials(job: JobSpec) -> int:
    """Trials Tune runs at once: those whose worker groups fit, plus the standby ones (not
    with parameter servers: a standby would start its servers, holding CPUs, while it waits)."""
    from roundhouse.cluster.services import service_cpus

    return concurrent_trials(job) + (STANDBY_TRIALS if service_cpus(job) == 0 else 0)


def build_tuner(plan: SweepPlan, resume: bool) -> Any:
    """A new `Tuner`, or the one restored from the sweep folder (`--resume`)."""
    from ray import tune

    trainable = tune.with_resources(
        tune.with_parameters(run_trial, plan=trial_settings(plan)), {"CPU": TRIAL_CPUS}
    )
    path = f"{plan.sweep_url}/{TUNE_FOLDER}"
    if resume:
        if not tune.Tuner.can_restore(path):
            raise ClusterError(
                f"no sweep to resume at {plan.sweep_url}", "start it without --resume first"
            )
        return tune.Tuner.restore(
            path, trainable, resume_unfinished=True, resume_errored=True, restart_errored=False
        )
    tune_config = tune.TuneConfig(
        metric=plan.metric,
        mode=plan.mode,
        num_samples=plan.samples,
        search_alg=build_searcher(plan),
        scheduler=build_scheduler(plan),
        # A variant generator limits itself (Tune would warn that it ignores this).
        max_concurrent_trials=None if plan.searcher != "bayes" else running_trials(plan.job),
        trial_dirname_creator=lambda trial: trial.trial_id,
    )
    run_config = tune.RunConfig(
        name=TUNE_FOLDER,
        storage_path=plan.sweep_url,
        verbose=2 if plan.verbose else 0,
        failure_config=tune.FailureConfig(max_failures=0),
    )
    return tune.Tuner(
        trainable,
        param_space=build_param_space(plan),
        tune_config=tune_config,
        run_config=run_config,
    )


def trial_settings(plan: SweepPlan) -> dict[str, Any]:
    """What every trial needs from the plan (plain data: it travels to the trial actors)."""
    return {
        "job": plan.job.model_dump(mode="json"),
        "sweep_id": plan.sweep_id,
        "sweep_url": plan.sweep_url,
        "metric": plan.metric,
    }


def run_sweep(plan: SweepPlan, resume: bool = False) -> Any:
    """Run (or resume) the sweep on the connected Ray cluster; return Tune's `ResultGrid`.

    Raises:
        Preempted: the sweep got SIGTERM; its training trials checkpointed (`preempt`).
    """
    with scoped_env(tune_console_env(plan.verbose)):
        tuner = build_tuner(plan, resume)
        grace_s = plan.job.cluster.preempt_grace_s
        with SweepMonitor(plan), SweepPreemption(plan.sweep_url, grace_s) as preemption:
            results = tuner.fit()
    if preemption.signalled:
        raise preemption.error(plan.sweep_id)
    return results


def tune_console_env(verbose: bool) -> dict[str, str]:
    """Tune's console: its status tables with `--verbose`, else nothing (roundhouse's lines).

    Tune's newer console prints its experiment box and a final status table even at
    `verbose=0`; its classic one (`RAY_AIR_NEW_OUTPUT=0`) at `verbose=0` prints nothing.
    """
    return {} if verbose else {"RAY_AIR_NEW_OUTPUT": "0"}


class SweepMonitor:
    """One console line per trial that ends, read from the trial run folders' status files."""

    def __init__(self, plan: SweepPlan) -> None:
        self.plan = plan
        self.seen: set[str] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="roundhouse-sweep", daemon=True)

    def __enter__(self) -> SweepMonitor:
        # Trials that ended before a --resume (not the interrupted ones: they go on).
        self.seen = {k for k, r in self.ended().items() if r.status != "killed"}
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def ended(self) -> dict[str, Any]:
        """The trial's run record once its run folder says it ended, else an empty dict."""
        from roundhouse.runs.reader import find_run_urls, read_run

        try:
            runs = [read_run(u) for u in find_run_urls(self.plan.sweep_url)]
        except Exception:
            return {}
        return {r.run_id: r for r in runs if r.status in ("finished", "failed", "killed")}

    def _run(self) -> None:
        while not self._stop.wait(5.0):
            for run_id, run in self.ended().items():
                if run_id not in self.seen:
                    self.seen.add(run_id)
                    best = run.best(self.plan.metric)
                    shown = "-" if best is None else f"{best:.4f}"
                    logger.info(
                        "trial %s %s after %d steps: best %s %s",
                        run_id,
                        "stopped" if run.status == "killed" else run.status,  # by the scheduler
                        run.steps,
                        self.plan.metric,
                        shown,
                    )


# --- inside a trial actor ---------------------------------------------------------------------


def trial_job(settings: dict[str, Any], values: dict[str, Any], trial_id: str) -> JobSpec:
    """The base job with this trial's values, run folder `<name>/tune-<id>/<trial id>`."""
    job = apply_params(validate_job(settings["job"], source="sweep"), values)
    job.storage.run_id = f"{settings['sweep_id']}/{trial_id}"
    job.tracking.wandb.group = settings["sweep_id"]  # W&B runs grouped by sweep
    job.tracking.console = "off"  # the sweep driver owns the console
    return job


def prepare_trial(job: JobSpec) -> tuple[Any, bool]:
    """The trial's run folder: resumed from its latest checkpoint when it has one."""
    from roundhouse.weights.checkpoint import CHECKPOINTS, LATEST
    from roundhouse.weights.run_folder import PreparedRun, prepare_run, write_job_yaml

    run_dir = run_dir_of(job)
    if run_dir.exists(CHECKPOINTS, LATEST):
        write_job_yaml(run_dir, job)
        return PreparedRun(job, run_dir, None), True
    return prepare_run(job), False


def run_trial(config: dict[str, Any], plan: dict[str, Any]) -> None:
    """Tune's function trainable: train one job, reporting every evaluation as it lands."""
    from ray import tune

    from roundhouse.cluster.quiet import configure_worker_logging
    from roundhouse.cluster.workers import train_on_ray

    configure_worker_logging()
    trial_id = tune.get_context().get_trial_id()
    job = trial_job(plan, config, trial_id)
    if already_finished(job):  # a resumed sweep whose state missed this trial's end
        report_evaluations(MetricsTail(run_dir_of(job)), plan["metric"], lambda: False)
        return
    preemption = TrialPreemption(plan["sweep_url"], trial_id, run_dir_of(job))
    preemption.check_before_start()
    prepared, resume = prepare_trial(job)
    if resume:
        logger.warning("trial %s resumes from its latest checkpoint", job.storage.run_id)
    outcome: dict[str, Any] = {}

    def train() -> None:
        try:
            outcome["metrics"] = train_on_ray(
                prepared, resume=resume, queue_timeout_s=TRIAL_QUEUE_TIMEOUT_S
            )
        except BaseException as exc:
            outcome["error"] = exc

    thread = threading.Thread(target=train, name="roundhouse-trial", daemon=True)
    thread.start()

    def running() -> bool:  # the sweep's SIGTERM is handed on here (`preempt`)
        return thread.is_alive() and not preemption.poll()

    report_evaluations(MetricsTail(prepared.run_dir), plan["metric"], running)
    preemption.stopped()
    if thread.is_alive():  # preempted while its workers were still queued
        raise preemption.error("while it waited for its workers")
    if "error" in outcome:
        raise outcome["error"]


def already_finished(job: JobSpec) -> bool:
    """Whether the trial's run folder says it trained to the end."""
    from roundhouse.runs.status import FINISHED, recorded_status

    return recorded_status(run_dir_of(job)) == FINISHED


def report_evaluations(tail: MetricsTail, metric: str, running: Callable[[], bool]) -> None:
    """`tune.report` each row holding `metric` while `running()` and then the rest; the test
    metrics go with a last report."""
    from ray import tune

    latest: dict[str, float] = {}
    unreported = False
    while True:
        done = not running()
        for row in tail.read_new():
            latest.update({k: v for k, v in row.items() if "/" in k and _is_number(v)})
            latest["step"] = row.get("step", 0)
            if metric in row:
                tune.report(dict(latest))
                unreported = False
            elif any(k.startswith("test/") for k in row):
                unreported = True
        if done:
            break
        time.sleep(POLL_S)
    if unreported and metric in latest:
        tune.report(dict(latest))


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def sweep_env() -> dict[str, str]:
    """Environment for Tune: one pending trial at a time (the rest queue in Tune)."""
    # Tune's experiment state (what `--resume` restores) saved every 2 s, not every >= 10 s.
    return {"TUNE_MAX_PENDING_TRIALS_PG": "1", "TUNE_GLOBAL_CHECKPOINT_S": "2"}


def apply_sweep_env() -> None:
    """Set the sweep's embedded-cluster environment (each key only where the user left it unset)."""
    for key, value in sweep_env().items():
        os.environ.setdefault(key, value)
