"""Run tracking: `metrics.jsonl` (always), Weights & Biases and the console.

Only the main process (rank 0) writes; every other rank gets a `Tracker` whose methods do
nothing, so the training loop never branches on rank. `wandb` is imported lazily, inside the
tracker, so that importing roundhouse (and `roundhouse --help`) stays fast.

W&B mode `auto` is online when `WANDB_API_KEY` is set and offline otherwise (a `WANDB_MODE`
environment variable, the usual W&B switch, wins over both). Offline runs live in
`<run folder>/wandb/offline-run-*`; at the end the tracker logs the `wandb sync` command that
uploads them. The W&B run id is kept in `<run folder>/wandb_run_id`, so a resumed job continues
the same W&B run.

Secrets never reach a file: the job config is passed through `redact_secrets` before W&B sees it.
"""

from __future__ import annotations

import logging
import os
import re
import secrets
import struct
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from roundhouse.config import JobSpec, WandbConfig
from roundhouse.runs.console import NullProgress, Progress, build_progress, format_metrics
from roundhouse.runs.metrics_file import MetricsFile
from roundhouse.runs.rundir import RunDir
from roundhouse.runs.status import EXIT_PREEMPTED

logger = logging.getLogger(__name__)

WANDB_ID_FILE = "wandb_run_id"
REDACTED = "***"
# Environment variables whose values must never be written anywhere.
_AWS_ENV_VARS = ("AWS_SECRET_ACCESS_KEY", "AWS_ACCESS_KEY_ID", "AWS_SESSION_TOKEN")
_AZURE_ENV_VARS = ("AZURE_STORAGE_KEY", "AZURE_STORAGE_CONNECTION_STRING")
SECRET_ENV_VARS = ("WANDB_API_KEY", "HF_TOKEN", *_AWS_ENV_VARS, *_AZURE_ENV_VARS)
# Key names (lower case, punctuation removed) that hold secrets. `token` only as a suffix, so that
# `max_tokens` or `tokenizer` stay readable.
_SECRET_KEY_PARTS = ("apikey", "secret", "password", "passwd", "accesskey", "credential")
_SECRET_KEY_PARTS += ("privatekey", "connectionstring", "authorization")
_NOT_ALNUM = re.compile(r"[^a-z0-9]")
# How long `close` waits for wandb-core to write out an offline run's `.wandb` file.
WANDB_FLUSH_TIMEOUT_S = 30.0


# --- secrets ------------------------------------------------------------------------------------


def is_secret_key(key: str) -> bool:
    """Whether a config key names a secret (`api_key`, `AWS_SECRET_ACCESS_KEY`, `HF_TOKEN`)."""
    compact = _NOT_ALNUM.sub("", key.lower())
    return (
        compact == "key"
        or compact.endswith("token")
        or any(p in compact for p in _SECRET_KEY_PARTS)
    )


def _secret_env_values() -> list[str]:
    return [v for name in SECRET_ENV_VARS if (v := os.environ.get(name))]


def _redact_string(text: str, env_values: list[str]) -> str:
    for value in env_values:
        if text == value:
            return REDACTED
        # Substrings only for values long enough not to match by accident (e.g. inside a URL).
        if len(value) >= 8 and value in text:
            text = text.replace(value, REDACTED)
    return text


def _redact(obj: Any, env_values: list[str]) -> Any:
    if isinstance(obj, dict):
        return {
            k: REDACTED if isinstance(k, str) and is_secret_key(k) else _redact(v, env_values)
            for k, v in obj.items()
        }
    if isinstance(obj, (list, tuple)):
        return type(obj)(_redact(v, env_values) for v in obj)
    if isinstance(obj, str):
        return _redact_string(obj, env_values)
    return obj


def redact_secrets(obj: Any) -> Any:
    """A copy of `obj` with secrets replaced by `"***"`.

    Dicts, lists and tuples are copied recursively. The value of every key that looks secret
    (`api_key`, `token`, `secret`, `password`, `access_key`, `credentials`, ... case-insensitive)
    is replaced whole, and every string equal to (or, for values of 8+ characters, containing)
    the current value of a secret environment variable (`WANDB_API_KEY`,
    `AWS_SECRET_ACCESS_KEY`, `AWS_ACCESS_KEY_ID`, `AWS_SESSION_TOKEN`, ...) is redacted.

    Args:
        obj: A JSON-like structure, e.g. `job.model_dump(mode="json")`.

    Returns:
        The redacted copy; `obj` itself is not changed.
    """
    return _redact(obj, _secret_env_values())


# --- metrics.jsonl ------------------------------------------------------------------------------


def as_number(value: Any) -> Any:
    """A plain Python number for a tensor or numpy scalar (anything with `.item()`)."""
    return value.item() if hasattr(value, "item") else value


# --- W&B ----------------------------------------------------------------------------------------


def resolve_wandb_mode(mode: str) -> str:
    """`online | offline | disabled` for `tracking.wandb.mode`.

    `auto` follows `WANDB_MODE` when set (`dryrun` means offline), else online when
    `WANDB_API_KEY` is set, else offline.
    """
    if mode != "auto":
        return mode
    env_mode = os.environ.get("WANDB_MODE", "").strip().lower()
    if env_mode in ("online", "offline", "disabled"):
        return env_mode
    if env_mode == "dryrun":
        return "offline"
    return "online" if os.environ.get("WANDB_API_KEY") else "offline"


def get_wandb_run_id(run_dir: RunDir) -> str:
    """The W&B run id stored in the run folder, created (and stored) on first use."""
    if run_dir.exists(WANDB_ID_FILE):
        stored = run_dir.read_text(WANDB_ID_FILE).strip()
        if stored:
            return stored
    run_id = secrets.token_hex(4)
    run_dir.write_text(WANDB_ID_FILE, run_id + "\n")
    return run_id


def wandb_staging_dir(job_name: str, run_dir: RunDir) -> Path:
    """Local folder for W&B files of a run whose folder is remote (stable across restarts)."""
    folder_id = run_dir.url.rsplit("/", 1)[-1]
    return Path(tempfile.gettempdir()) / "roundhouse-wandb" / job_name / folder_id


def build_wandb_settings(mode: str) -> Any:
    """Quiet, cheap W&B settings: the tracker logs its own one-line summary."""
    import wandb

    return wandb.Settings(
        console="off",  # no stdout/stderr capture: the console belongs to the trainer
        disable_code=True,  # no source snapshot
        save_code=False,
        disable_git=True,  # no git subprocesses (and no diff of a dirty tree)
        x_save_requirements=False,  # no `pip freeze`-like scan of installed packages
        x_disable_stats=True,  # no system-metrics sampler process competing for CPU
        silent=mode == "offline",  # offline: nothing to show; online keeps the run URL
        quiet=True,
    )


@dataclass
class WandbPlan:
    """Where and how one W&B run is started."""

    mode: str
    dir: Path  # W&B writes under <dir>/wandb/
    staged: bool  # `dir` is a local stand-in for a remote run folder
    run_id: str
    name: str


def plan_wandb(job: JobSpec, run_dir: RunDir, mode: str) -> WandbPlan:
    """Resolve the W&B folder, run id and name for this run."""
    local = run_dir.local_path()
    folder = Path(local) if local is not None else wandb_staging_dir(job.name, run_dir)
    folder.mkdir(parents=True, exist_ok=True)
    folder_id = run_dir.url.rsplit("/", 1)[-1]
    return WandbPlan(
        mode=mode,
        dir=folder,
        staged=local is None,
        run_id=get_wandb_run_id(run_dir),
        name=f"{job.name}-{folder_id}",
    )


def wandb_log_finished(path: Path) -> bool:
    """Whether a `.wandb` transaction log holds the run's exit record (written last).

    `run.finish()` returns before wandb-core has flushed and closed the file (closing the stream
    is requested asynchronously), so the tracker waits for this before announcing or copying an
    offline run. Format: a 7-byte header, then LevelDB-log chunks `crc u32, length u16, type u8`
    in 32 KiB blocks (FULL=1, FIRST=2, MIDDLE=3, LAST=4); see tests/helpers/wandb_reader.py.
    """
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes() if path.exists() else b""
    pos, payload, block = 7, b"", 32 * 1024
    while pos + 7 <= len(data):
        if block - pos % block < 7:
            pos += block - pos % block  # zero padding at a block's end
            continue
        length, kind = struct.unpack_from("<HB", data, pos + 4)
        chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind == 0 or len(chunk) < length:
            return False  # not written yet
        payload = payload + chunk if kind in (3, 4) else chunk
        if kind in (1, 4) and pb.Record.FromString(payload).HasField("exit"):
            return True
    return False


def wait_for_wandb_log(path: Path, timeout_s: float = WANDB_FLUSH_TIMEOUT_S) -> bool:
    """Poll until `wandb_log_finished(path)`; False after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while not wandb_log_finished(path):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def _init_wandb(cfg: WandbConfig, plan: WandbPlan, config: dict[str, Any]) -> Any:
    import wandb

    return wandb.init(
        project=cfg.project,
        entity=cfg.entity,
        group=cfg.group,
        tags=cfg.tags or None,
        name=plan.name,
        id=plan.run_id,
        resume="allow",
        dir=str(plan.dir),
        mode=plan.mode,
        config=config,
        job_type="train",
        reinit="create_new",  # never touch (or finish) a W&B run the user's own code started
        settings=build_wandb_settings(plan.mode),
    )


class WandbRun:
    """One W&B run: log rows, update the summary, finish and say how to sync."""

    def __init__(self, run: Any, plan: WandbPlan, run_dir: RunDir) -> None:
        self.run = run
        self.plan = plan
        self.run_dir = run_dir
        self.sync_file = Path(run.settings.sync_file)

    def log(self, metrics: dict[str, Any], *, step: int, epoch: int) -> None:
        """One history row at `step` (rows logged at the same step are merged by W&B)."""
        self.run.log({**metrics, "epoch": epoch}, step=step)

    def summary(self, values: dict[str, Any]) -> None:
        """Set final values in the run summary."""
        self.run.summary.update(values)

    def finish(self, *, failed: bool, preempted: bool = False) -> None:
        """Finish the run (a preempted one as W&B's `preempted`: marked preempting, exit code
        143); offline, copy a staged run to the run folder and log `wandb sync`."""
        if preempted:
            self.run.mark_preempting()
        self.run.finish(exit_code=EXIT_PREEMPTED if preempted else 1 if failed else 0)
        if self.plan.mode != "offline":
            return
        if not wait_for_wandb_log(self.sync_file):
            logger.warning("W&B has not finished writing %s yet", self.sync_file)
        offline_dirs = sorted((self.plan.dir / "wandb").glob(f"offline-run-*-{self.plan.run_id}"))
        if self.plan.staged:
            self._upload_staged(offline_dirs)
        paths = " ".join(str(p) for p in offline_dirs)
        where = f" (local staging copy of {self.run_dir.url})" if self.plan.staged else ""
        logger.info("W&B run saved offline%s; upload it with: wandb sync %s", where, paths)

    def _upload_staged(self, offline_dirs: list[Path]) -> None:
        """Copy the offline run folders into `<run folder>/wandb/` on remote storage."""
        root = self.plan.dir
        for folder in offline_dirs:
            for file in sorted(p for p in folder.rglob("*") if p.is_file()):
                self.run_dir.write_bytes(file.relative_to(root).as_posix(), file.read_bytes())


def build_wandb_run(job: JobSpec, run_dir: RunDir, config: dict[str, Any]) -> WandbRun | None:
    """Start the W&B run for `job`, or return None when `tracking.wandb.mode` resolves to disabled.

    An online start that fails (no network, bad key) falls back to offline with a warning:
    training is not worth losing over a dashboard.
    """
    mode = resolve_wandb_mode(job.tracking.wandb.mode)
    if mode == "disabled":
        return None
    plan = plan_wandb(job, run_dir, mode)
    try:
        run = _init_wandb(job.tracking.wandb, plan, config)
    except Exception as exc:
        if mode != "online":
            raise
        # The failed run's id stays taken inside wandb-core for this process: use a new one.
        plan.mode, plan.run_id = "offline", secrets.token_hex(4)
        logger.warning("W&B online start failed (%s); logging offline as %s", exc, plan.run_id)
        run = _init_wandb(job.tracking.wandb, plan, config)
    if plan.staged:
        logger.info("W&B files of %s are staged locally in %s", run_dir.url, plan.dir)
    return WandbRun(run, plan, run_dir)


# --- the tracker --------------------------------------------------------------------------------


def _numeric_items(values: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in values.items() if type(v) in (int, float)}  # not bools


class Tracker:
    """Metrics for one run: `metrics.jsonl`, W&B and the console.

    Only the main process writes. On other ranks (`is_main=False`) every method returns at once,
    so the training loop can call the tracker unconditionally.

    Args:
        job: The resolved job; `job.tracking` configures W&B and the console.
        run_dir: The run folder (`metrics.jsonl`, `wandb_run_id` and offline `wandb/` go there).
        is_main: Whether this process is rank 0.
        resumed: Whether the run continues from a checkpoint (metrics are appended either way;
            the W&B run id stored in the run folder is reused either way).
        resume_step: The step of the restored checkpoint; rows logged after it are dropped
            from metrics.jsonl, because the resumed run logs those steps again.
        total_steps: Optimizer steps of the whole run, for the progress bar's ETA.
        extra_config: More config for W&B, e.g. `{"model/num_params": N}`; numeric values also
            go into the W&B summary.
    """

    def __init__(
        self,
        job: JobSpec,
        run_dir: RunDir,
        *,
        is_main: bool,
        resumed: bool = False,
        resume_step: int | None = None,
        total_steps: int | None = None,
        extra_config: dict[str, Any] | None = None,
    ) -> None:
        self.job = job
        self.run_dir = run_dir
        self.is_main = is_main
        self.resumed = resumed
        self._closed = False
        self._metrics: MetricsFile | None = None
        self._wandb: WandbRun | None = None
        self._progress: Progress = NullProgress()
        if not is_main:
            return
        extra = dict(extra_config or {})
        self._metrics = MetricsFile(run_dir, resume_step if resumed else None)
        self._wandb = build_wandb_run(job, run_dir, self.build_config(extra))
        if self._wandb is not None and _numeric_items(extra):
            self._wandb.summary(_numeric_items(extra))
        self._progress = build_progress(job.tracking.console, total_steps)

    def build_config(self, extra_config: dict[str, Any]) -> dict[str, Any]:
        """The config W&B records: the resolved job plus `extra_config`, secrets redacted."""
        return redact_secrets({**self.job.model_dump(mode="json"), **extra_config})

    @property
    def wandb_run_id(self) -> str | None:
        """The W&B run id, or None when W&B is off (or on non-main ranks)."""
        return None if self._wandb is None else self._wandb.plan.run_id

    def log(self, metrics: dict[str, float], *, step: int, epoch: int) -> None:
        """Record metrics at an optimizer step.

        Writes one line to `metrics.jsonl` (`step`, `epoch`, `time` and the metrics), one W&B
        history row, and, when `metrics` holds `val/` or `test/` keys, one console line.

        Args:
            metrics: `<split>/<name>` -> number (0-d tensors and numpy scalars are converted),
                e.g. `{"train/loss": 0.31}`.
            step: Optimizer step.
            epoch: Epoch the step belongs to.
        """
        if self._metrics is None or self._closed:
            return
        metrics = {key: as_number(value) for key, value in metrics.items()}
        self._metrics.append({"step": step, "epoch": epoch, "time": time.time(), **metrics})
        if self._wandb is not None:
            self._wandb.log(metrics, step=step, epoch=epoch)
        shown = {k: v for k, v in metrics.items() if k.startswith(("val/", "test/"))}
        if shown:
            self._progress.message(f"epoch {epoch} | step {step} | {format_metrics(shown)}")

    def update_progress(
        self, *, step: int, epoch: int, loss: float | None, samples_per_s: float | None
    ) -> None:
        """Move the console progress (cheap: no I/O unless a plain line is due)."""
        if self._closed:
            return
        self._progress.update(step=step, epoch=epoch, loss=loss, samples_per_s=samples_per_s)

    def summary(self, values: dict[str, float]) -> None:
        """Put final metrics (e.g. `test/accuracy`) into the W&B run summary."""
        if self._wandb is not None and not self._closed:
            self._wandb.summary(values)

    def flush(self) -> None:
        """Flush `metrics.jsonl` (and upload it on remote storage)."""
        if self._metrics is not None:
            self._metrics.flush()

    def close(self, *, failed: bool = False, preempted: bool = False) -> None:
        """Stop the progress bar, finish W&B (exit code 1 if `failed`; a `preempted` run, one
        stopped by SIGTERM after its checkpoint, as W&B's preempted), flush. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._progress.close()
        try:
            if self._wandb is not None:
                self._wandb.finish(failed=failed, preempted=preempted)
        finally:
            if self._metrics is not None:
                self._metrics.close()

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *_: object) -> None:
        self.close(failed=exc_type is not None)
