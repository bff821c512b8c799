"""Local shard cache: download once, verify sha256 once, evict least recently used, prefetch.

Cached files are named by their sha256, so a file in the cache is by construction a verified
copy (it is renamed into place only after its hash matched the index), and datasets sharing a
shard share its copy. Processes on one node can share a cache folder: downloads go to private
temporary names, renames are atomic, and an evicted file that another process still has open
stays readable until it closes it (POSIX semantics).

Local datasets (`file://` or a path) are read in place; each shard is hashed before its first
use, once per file version: a verified file leaves a marker named by its sha256 and its
identity (device, inode, size, mtime) under `<cache_dir>/verified/`, so later processes (the
next run, DataLoader workers, resumed jobs) skip re-hashing an unchanged file. A rewritten or
modified file has a new identity and is hashed again.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from roundhouse.errors import DataError

from .index import ShardInfo
from .storage import is_local, join, storage_errors

logger = logging.getLogger(__name__)

_READ_BYTES = 8 << 20
ON_CORRUPT = ("error", "skip")


class CorruptShard(DataError):
    """A shard whose sha256 does not match the index."""


def _check_writable(folder: str) -> None:
    try:
        os.makedirs(folder, exist_ok=True)
        probe = os.path.join(folder, f".probe-{uuid.uuid4().hex}")
        with open(probe, "wb"):
            pass
        os.remove(probe)
    except OSError as err:
        raise DataError(
            f"cache directory {folder} is not writable: {err.strerror or err}",
            "set data.cache.dir (or $ROUNDHOUSE_CACHE) to a writable folder",
        ) from err


class ShardCache:
    """Gives local paths of verified shards, downloading them when needed.

    Args:
        fs: The dataset's filesystem.
        root: The dataset's root path on `fs`.
        url: The dataset URL (for messages).
        cache_dir: Local folder for downloaded shards (local datasets: verification markers).
        limit_bytes: Evict least recently used shards above this total.
        on_corrupt: `error` raises on a checksum mismatch; `skip` counts it and returns None.
        prefetch_threads: Background download threads.

    Raises:
        DataError: When the cache directory cannot be written or `on_corrupt` is unknown.
    """

    def __init__(
        self,
        fs: Any,
        root: str,
        url: str,
        *,
        cache_dir: str,
        limit_bytes: int,
        on_corrupt: str = "error",
        prefetch_threads: int = 2,
    ) -> None:
        if on_corrupt not in ON_CORRUPT:
            raise DataError(f"unknown on_corrupt {on_corrupt!r}", f"valid: {', '.join(ON_CORRUPT)}")
        self.fs, self.root, self.url = fs, root, url.rstrip("/")
        self.local = is_local(fs)
        self.cache_dir, self.limit_bytes, self.on_corrupt = cache_dir, limit_bytes, on_corrupt
        if not self.local:
            _check_writable(cache_dir)
        self.corrupt: set[str] = set()
        self.downloads = 0
        self._verified: set[str] = set()
        self._lock = threading.Lock()
        self._pending: dict[str, Future] = {}
        self._pinned: set[str] = set()
        self._pool = ThreadPoolExecutor(prefetch_threads, thread_name_prefix="shard-prefetch")

    @property
    def corrupt_skipped(self) -> int:
        """Shards skipped for a checksum mismatch so far (with `on_corrupt: skip`)."""
        return len(self.corrupt)

    def prefetch(self, shards: list[ShardInfo]) -> None:
        """Starts background downloads of `shards` (the next ones to be read) and pins them."""
        with self._lock:
            self._pinned = {s.sha256 for s in shards}
            for shard in shards:
                if shard.sha256 not in self._pending:
                    self._pending[shard.sha256] = self._pool.submit(self._fetch, shard)

    def path(self, shard: ShardInfo) -> str | None:
        """The local path of a verified copy of `shard`; None if it is corrupt and skipped.

        Raises:
            DataError: For a missing shard, denied access, or a corrupt shard with
                `on_corrupt: error`.
        """
        with self._lock:
            future = self._pending.get(shard.sha256)
            if future is None:
                future = self._pending[shard.sha256] = self._pool.submit(self._fetch, shard)
        try:
            return future.result()
        except CorruptShard:
            if self.on_corrupt == "error":
                raise
            if shard.name not in self.corrupt:
                logger.warning("skipping corrupt shard %s (checksum mismatch)", shard.name)
            self.corrupt.add(shard.name)
            return None
        finally:
            with self._lock:
                # Forget finished futures so an evicted shard is fetched again later.
                if future.done() and self._pending.get(shard.sha256) is future:
                    del self._pending[shard.sha256]

    def close(self) -> None:
        """Stops the download threads."""
        self._pool.shutdown(wait=False, cancel_futures=True)

    # --- inside the download threads -----------------------------------------------------------

    def _fetch(self, shard: ShardInfo) -> str:
        remote = join(self.root, shard.name)
        if self.local:
            if shard.sha256 not in self._verified:
                self._verify_local(shard, remote)
                self._verified.add(shard.sha256)
            return remote
        target = os.path.join(self.cache_dir, f"{shard.sha256}.parquet")
        if os.path.exists(target):
            os.utime(target)  # the LRU clock
            return target
        self._download(shard, remote, target)
        return target

    def _download(self, shard: ShardInfo, remote: str, target: str) -> None:
        self._evict(incoming=shard.bytes)
        tmp = f"{target}.{uuid.uuid4().hex}.part"
        where = f"{self.url}/{shard.name}"
        try:
            with (
                storage_errors(f"shard {shard.name}", where, "re-run roundhouse data prepare"),
                self.fs.open(remote, "rb") as source,
                open(tmp, "wb") as sink,
            ):
                digest = self._hash_stream(source, sink)
            self._verify(shard, digest)
            os.replace(tmp, target)
            self.downloads += 1
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)

    def _verify_local(self, shard: ShardInfo, path: str) -> None:
        where = f"{self.url}/{shard.name}"
        with storage_errors(f"shard {shard.name}", where, "re-run roundhouse data prepare"):
            stat = os.stat(path)
            marker = os.path.join(
                self.cache_dir,
                "verified",
                f"{shard.sha256}.{stat.st_dev}.{stat.st_ino}.{stat.st_size}.{stat.st_mtime_ns}",
            )
            if os.path.exists(marker):
                return
            with open(path, "rb") as handle:
                digest = self._hash_stream(handle, None)
        self._verify(shard, digest)
        try:  # best effort: without a writable cache the file is hashed again next time
            os.makedirs(os.path.dirname(marker), exist_ok=True)
            with open(marker, "wb"):
                pass
        except OSError:
            pass

    @staticmethod
    def _hash_stream(source: Any, sink: Any) -> str:
        digest = hashlib.sha256()
        while chunk := source.read(_READ_BYTES):
            digest.update(chunk)
            if sink is not None:
                sink.write(chunk)
        return digest.hexdigest()

    def _verify(self, shard: ShardInfo, digest: str) -> None:
        if digest != shard.sha256:
            raise CorruptShard(
                f"shard {shard.name} of {self.url} is corrupt (sha256 {digest[:12]}..., index "
                f"says {shard.sha256[:12]}...)",
                "re-run roundhouse data prepare, or set data.on_corrupt: skip",
            )

    def _evict(self, incoming: int) -> None:
        """Deletes least recently used cached shards until `incoming` more bytes fit."""
        with self._lock:
            pinned = set(self._pinned)
        entries = []
        for name in os.listdir(self.cache_dir):
            if name.endswith(".parquet"):
                full = os.path.join(self.cache_dir, name)
                try:
                    stat = os.stat(full)
                except FileNotFoundError:  # evicted by another process just now
                    continue
                entries.append((stat.st_mtime, stat.st_size, name, full))
        total = sum(size for _, size, _, _ in entries)
        for _, size, name, full in sorted(entries):
            if total + incoming <= self.limit_bytes:
                break
            if name.removesuffix(".parquet") in pinned:
                continue
            try:
                os.remove(full)
                total -= size
            except FileNotFoundError:
                total -= size
