"""fsspec access for datasets: resolve URLs, translate storage failures into `DataError`s.

Every read or write of a dataset URL goes through `storage_errors`, so that a missing object,
denied credentials or an unreachable endpoint reach the user as one line naming the object.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from typing import Any

from fsspec.core import url_to_fs

from roundhouse.errors import DataError

logger = logging.getLogger(__name__)

# Fragments of botocore/s3fs error text that mean "your credentials are wrong", not "no such
# object"; s3fs maps some of them to PermissionError, others stay generic OSErrors.
_DENIED_HINTS = ("InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "Forbidden", "403")
_CREDENTIALS_FIX = (
    "check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (or the storage credentials) and the "
    "endpoint (AWS_ENDPOINT_URL)"
)


def open_url(url: str, storage_options: dict[str, Any] | None = None) -> tuple[Any, str]:
    """Returns `(filesystem, root path)` for a dataset URL or local path.

    Raises:
        DataError: When the protocol is unknown or its fsspec backend is not installed.
    """
    try:
        fs, root = url_to_fs(url, **(storage_options or {}))
    except (ImportError, ValueError) as err:
        raise DataError(
            f"cannot open {url}: {err}", "install the fsspec backend (s3fs, gcsfs) for it"
        ) from err
    return fs, root.rstrip("/")


def is_local(fs: Any) -> bool:
    """True for the local filesystem, where shards are read in place instead of cached."""
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    return protocol in ("file", "local")


def join(root: str, name: str) -> str:
    """Joins a root path and an object name with exactly one `/`."""
    return f"{root}/{name}" if root else name


def _is_denied(err: BaseException) -> bool:
    text = f"{type(err).__name__} {err}"
    return isinstance(err, PermissionError) or any(hint in text for hint in _DENIED_HINTS)


@contextlib.contextmanager
def storage_errors(what: str, url: str, missing_fix: str) -> Iterator[None]:
    """Turns storage exceptions raised inside the block into one-line `DataError`s.

    Args:
        what: What is being read or written, e.g. `"shard train-00003.parquet"`.
        url: The full URL, shown in the message.
        missing_fix: How to fix a missing object.
    """
    try:
        yield
    except DataError:
        raise
    except FileNotFoundError as err:
        raise DataError(f"{what} not found at {url}", missing_fix) from err
    except Exception as err:
        if _is_denied(err):
            raise DataError(f"access denied to {what} at {url}", _CREDENTIALS_FIX) from err
        if isinstance(err, OSError) or "botocore" in type(err).__module__:
            raise DataError(f"cannot access {what} at {url}: {err}", _CREDENTIALS_FIX) from err
        raise


def write_atomic(fs: Any, path: str, data: bytes) -> None:
    """Writes `data` so that readers see either nothing or all of it.

    Object stores make a single PUT visible atomically; on a local disk the bytes go to a
    temporary file first and are renamed into place.
    """
    if not is_local(fs):
        fs.pipe_file(path, data)
        return
    fs.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "wb") as handle:
        handle.write(data)
    os.replace(tmp, path)


def default_cache_dir() -> str:
    """`$ROUNDHOUSE_CACHE` or `~/.cache/roundhouse/shards`: one shared, content-addressed cache."""
    base = os.environ.get("ROUNDHOUSE_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "roundhouse"
    )
    return os.path.join(base, "shards")


__all__ = ["default_cache_dir", "is_local", "join", "open_url", "storage_errors"]
