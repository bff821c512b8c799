"""The run folder, `<storage>/<job name>/<run id>/`, on any fsspec URL.

Every file a run writes goes through `RunDir`, so local paths, `s3://` and `memory://` behave the
same. Small files are written atomically: locally via a temporary file and `os.replace`, on object
stores by a single PUT (which is atomic there).
"""

from __future__ import annotations

import datetime as _dt
import os
import secrets
import tempfile
from dataclasses import dataclass

import fsspec
from fsspec.implementations.local import LocalFileSystem

from roundhouse.config import JobSpec
from roundhouse.errors import StorageError


def new_run_id() -> str:
    """A sortable, unique run id: `YYYYmmdd-HHMMSS-<4 hex>`."""
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    return f"{stamp}-{secrets.token_hex(2)}"


@dataclass
class RunDir:
    """One run folder. `url` is the folder's fsspec URL (or local path)."""

    url: str

    def __post_init__(self) -> None:
        self.url = self.url.rstrip("/")
        self.fs, self.path = fsspec.core.url_to_fs(self.url)

    @property
    def is_local(self) -> bool:
        """Whether the run folder is on the local file system."""
        return isinstance(self.fs, LocalFileSystem)

    def join(self, *parts: str) -> str:
        """The URL of `parts` inside the run folder."""
        return "/".join([self.path, *parts])

    def url_of(self, *parts: str) -> str:
        """The URL of the file `name` inside the run folder."""
        return "/".join([self.url, *parts])

    def ensure_writable(self) -> None:
        """Create the folder and prove it can be written, or raise `StorageError`."""
        try:
            self.fs.makedirs(self.path, exist_ok=True)
            self.write_text(".write_test", "ok")
            self.fs.rm(self.join(".write_test"))
        except (OSError, PermissionError, ValueError) as exc:
            raise StorageError(
                f"cannot write to storage path {self.url!r}: {exc}",
                "set storage.path to a writable folder or URL",
            ) from exc

    def exists(self, *parts: str) -> bool:
        """Whether `name` exists in the run folder."""
        return self.fs.exists(self.join(*parts))

    def read_bytes(self, *parts: str) -> bytes:
        """The bytes of the file `name`."""
        return self.fs.cat_file(self.join(*parts))

    def read_text(self, *parts: str) -> str:
        """The text of the file `name`."""
        return self.read_bytes(*parts).decode()

    def write_bytes(self, name: str, data: bytes) -> None:
        """Write a whole file atomically: readers see the old or the new content, never half."""
        target = self.join(name)
        parent = target.rsplit("/", 1)[0]
        self.fs.makedirs(parent, exist_ok=True)
        if not self.is_local:
            self.fs.pipe_file(target, data)
            return
        fd, tmp = tempfile.mkstemp(dir=parent, prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, target)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise

    def write_text(self, name: str, text: str) -> None:
        """Write `text` to `name` atomically (a reader never sees half a file)."""
        self.write_bytes(name, text.encode())

    def listdir(self, *parts: str) -> list[str]:
        """Names (not paths) in a subfolder; empty when it does not exist."""
        folder = self.join(*parts)
        if not self.fs.exists(folder):
            return []
        return sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in self.fs.ls(folder, detail=False))

    def remove(self, *parts: str) -> None:
        """Remove `name` (a file or a folder) if it exists."""
        target = self.join(*parts)
        if self.fs.exists(target):
            self.fs.rm(target, recursive=True)

    def local_path(self) -> str | None:
        """The folder as a local filesystem path, or None on remote storage."""
        return self.path if self.is_local else None


def job_folder(job: JobSpec) -> RunDir:
    """`<storage.path>/<job name>`: the parent of every run of this job."""
    return RunDir(f"{job.storage.path.rstrip('/')}/{job.name}")


def run_dir_of(job: JobSpec) -> RunDir:
    """`<storage.path>/<job name>/<run id>`: the run folder of a job bound to its run."""
    assert job.storage.run_id is not None
    return RunDir(f"{job_folder(job).url}/{job.storage.run_id}")
