"""Ray Jobs: submit roundhouse jobs to a cluster's dashboard; follow, list, inspect, stop them.

All use of `ray.job_submission` lives here. Every call goes through `JobsClient`, which turns
Ray's exceptions into one-line `ClusterError`s: an unreachable dashboard (checked first with a
short timeout, so a wrong address fails in seconds), a missing auth token, an unknown job id.

Exit codes of a job's outcome (`submit --wait`, `jobs status`, `jobs logs --follow`):
0 SUCCEEDED (and, for `jobs status`, PENDING or RUNNING: nothing failed yet), 1 FAILED,
3 STOPPED. 2 stays the code of a user error (bad job file, bad address, unknown id).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from roundhouse.cluster.runtime import ClusterError

logger = logging.getLogger(__name__)

TERMINAL_STATUSES = frozenset({"SUCCEEDED", "FAILED", "STOPPED"})
EXIT_CODES = {"SUCCEEDED": 0, "PENDING": 0, "RUNNING": 0, "FAILED": 1, "STOPPED": 3}
ADDRESS_ENV_VARS = ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS")
CONNECT_TIMEOUT_S = 5.0
POLL_INTERVAL_S = 1.0
AUTH_FIX = (
    "the cluster uses token authentication: set RAY_AUTH_MODE=token and RAY_AUTH_TOKEN "
    "(or ~/.ray/auth_token) to the cluster's token"
)


def exit_code(status: str) -> int:
    """The CLI exit code for a job status (see the module docstring)."""
    return EXIT_CODES.get(status, 1)


@dataclass(frozen=True)
class JobInfo:
    """What roundhouse shows about one Ray job."""

    job_id: str
    status: str
    entrypoint: str
    message: str
    start_time: float | None  # seconds since the epoch
    end_time: float | None

    @property
    def is_terminal(self) -> bool:
        """Whether the job has finished (succeeded, failed or stopped)."""
        return self.status in TERMINAL_STATUSES


def format_time(seconds: float | None) -> str:
    """Local time `YYYY-MM-DD HH:MM:SS`, or `-`."""
    if not seconds:
        return "-"
    return datetime.fromtimestamp(seconds).strftime("%Y-%m-%d %H:%M:%S")


def dashboard_address(address: str | None, environ: dict[str, str] | None = None) -> str:
    """The dashboard URL from `--address`, RAY_API_SERVER_ADDRESS or RAY_ADDRESS."""
    env = os.environ if environ is None else environ
    address = address or next((env[k] for k in ADDRESS_ENV_VARS if env.get(k)), None)
    if not address:
        raise ClusterError(
            "no Ray cluster address given",
            "pass --address http://HEAD:8265 (the dashboard) or set RAY_ADDRESS",
        )
    if address == "auto" or address.startswith("ray://"):
        raise ClusterError(
            f"address {address!r} is not a Ray dashboard address",
            "Ray Jobs talk to the dashboard: pass --address http://HEAD:8265",
        )
    if "://" not in address:
        address = f"http://{address}"
    return address.rstrip("/")


def _job_info(details: Any) -> JobInfo:
    start, end = details.start_time, details.end_time
    return JobInfo(
        job_id=details.submission_id or details.job_id or "-",
        status=str(getattr(details.status, "value", details.status)),
        entrypoint=details.entrypoint or "",
        message=(details.message or "").strip(),
        start_time=start / 1000 if start else None,  # Ray reports milliseconds
        end_time=end / 1000 if end else None,
    )


class JobsClient:
    """A connection to one cluster's Jobs API (the dashboard's HTTP address)."""

    def __init__(self, address: str | None) -> None:
        """Connect; an unreachable or refusing dashboard is a `ClusterError` within seconds."""
        self.address = dashboard_address(address)
        check_reachable(self.address)
        from ray.job_submission import JobSubmissionClient

        with self._errors():
            self._client = JobSubmissionClient(self.address)

    @contextlib.contextmanager
    def _errors(self, job_id: str | None = None) -> Iterator[None]:
        """Ray's exceptions -> one-line `ClusterError`s."""
        import requests
        from ray.exceptions import AuthenticationError

        try:
            yield
        except AuthenticationError as exc:
            raise ClusterError(
                f"the Ray dashboard at {self.address} refused the request: "
                f"{str(exc).splitlines()[0]}",
                AUTH_FIX,
            ) from None
        except (requests.RequestException, ConnectionError) as exc:
            raise ClusterError(
                f"lost the connection to the Ray dashboard at {self.address}: {_first_line(exc)}",
                "check that the head node is running; a submitted job keeps running there",
            ) from None
        except (RuntimeError, ValueError) as exc:
            text = _first_line(exc)
            if job_id is not None and ("404" in text or "does not exist" in text):
                raise ClusterError(
                    f"no job {job_id!r} on the cluster at {self.address}",
                    "see the ids with `roundhouse jobs list`",
                ) from None
            raise ClusterError(f"the Ray Jobs API failed: {text}", None) from None

    def submit(self, entrypoint: str, runtime_env: dict, metadata: dict[str, str]) -> str:
        """Submit a job; returns its submission id."""
        with self._errors():
            return self._client.submit_job(
                entrypoint=entrypoint, runtime_env=runtime_env, metadata=metadata
            )

    def info(self, job_id: str) -> JobInfo:
        """The job's status and details; a `ClusterError` for an unknown id."""
        with self._errors(job_id):
            return _job_info(self._client.get_job_info(job_id))

    def list_jobs(self) -> list[JobInfo]:
        """All jobs the cluster knows, oldest first."""
        with self._errors():
            jobs = [_job_info(d) for d in self._client.list_jobs()]
        return sorted(jobs, key=lambda j: j.start_time or 0.0)

    def logs(self, job_id: str) -> str:
        """Everything the job's driver printed so far."""
        with self._errors(job_id):
            return self._client.get_job_logs(job_id)

    def stop(self, job_id: str) -> bool:
        """Ask the job to stop; False when it was not running."""
        with self._errors(job_id):
            return self._client.stop_job(job_id)

    def wait(self, job_id: str, timeout_s: float | None = None) -> JobInfo:
        """Poll until the job is terminal (or `timeout_s` passed); returns its last info."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        info = self.info(job_id)
        while not info.is_terminal and (deadline is None or time.monotonic() < deadline):
            time.sleep(POLL_INTERVAL_S)
            info = self.info(job_id)
        return info

    def follow(self, job_id: str, write: Callable[[str], None]) -> JobInfo:
        """Stream the job's logs through `write` until it ends; returns its final info."""
        self.info(job_id)  # an unknown id fails here, with a clear message
        shown, complete = self._tail(job_id, write)
        if not complete:  # the log stream broke: poll the whole log from where it stopped
            self._poll_logs(job_id, write, shown)
        return self.wait(job_id)

    def _tail(self, job_id: str, write: Callable[[str], None]) -> tuple[int, bool]:
        """Stream over the dashboard's websocket: (characters written, whether it completed)."""
        shown = 0

        async def stream() -> None:
            nonlocal shown
            async for chunk in self._client.tail_job_logs(job_id):
                write(chunk)
                shown += len(chunk)

        import aiohttp

        try:
            asyncio.run(stream())
        except (RuntimeError, OSError, aiohttp.ClientError) as exc:
            logger.warning("the log stream of %s broke (%s); polling instead", job_id, exc)
            return shown, False
        return shown, True

    def _poll_logs(self, job_id: str, write: Callable[[str], None], shown: int = 0) -> None:
        """Write new log text every second until the job is terminal (re-reads the whole log)."""
        while True:
            info = self.info(job_id)
            text = self.logs(job_id)
            write(text[shown:])
            shown = max(shown, len(text))
            if info.is_terminal:
                return
            time.sleep(POLL_INTERVAL_S)


def check_reachable(address: str) -> None:
    """Fail fast with a `ClusterError` when nothing answers HTTP at `address`."""
    import requests

    try:
        requests.get(f"{address}/api/version", timeout=CONNECT_TIMEOUT_S)
    except requests.RequestException as exc:
        raise ClusterError(
            f"cannot reach the Ray dashboard at {address}: {_reason(exc)}",
            "check --address/RAY_ADDRESS (http://HEAD:8265) and that the head node is running",
        ) from None


def _reason(exc: Exception) -> str:
    text = str(exc)
    for marker in ("Connection refused", "timed out", "Name or service not known"):
        if marker in text:
            return marker.lower()
    return type(exc).__name__


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__
