"""Sources in buckets and on the Hub: ``gs://``, ``s3://``, ``hf://datasets/ORG/NAME/...`` (and any
other fsspec protocol, ``memory://`` in tests), read through fsspec.

Files are read in ranges (fsspec's block cache; a seek costs one ranged request), so a reader
of a byte range or of one Parquet row group fetches only that part. Listing (``**`` globs,
directories) goes through the file system's own ``glob`` / ``find``.

Why a retrying file of our own: gcsfs and s3fs retry a failed *request*, but a connection that
drops in the middle of a long read, or a throttled listing after many hours, surfaces as an
exception in the reader and would stop a training run. ``RetryingFile`` reopens the object at
the byte it had reached and tries again (``RETRIES`` times, exponential back-off), so a
transient failure costs seconds; a missing object or a permission error is never retried and
becomes a ``UserError`` naming the path and the fix.
"""

from __future__ import annotations

import io
import logging
import os
import time

from jaxcpt.config import ConfigError
from jaxcpt.errors import UserError

log = logging.getLogger(__name__)

RANGE_BYTES = 8 * 1024 * 1024  # one ranged request: large enough to amortise its latency, small for a row group
RETRIES = 5
BACKOFF_SECONDS = 0.5

_PACKAGES = {"gs": "gcsfs", "gcs": "gcsfs", "s3": "s3fs", "hf": "huggingface_hub"}
_CREDENTIALS = {
    "gs": "GOOGLE_APPLICATION_CREDENTIALS, `gcloud auth application-default login`, or the VM's service account",
    "s3": "AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, AWS_PROFILE, or the instance role",
    "hf": "HF_TOKEN or `huggingface-cli login` (gated or private datasets)",
}
class RemoteReadError(UserError):
    """A remote read that kept failing: not OSError, so the readers never count it as a damaged file."""


_NOT_RETRIED = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError, ValueError, TypeError)


def is_remote(path: str) -> bool:
    return "://" in path and not path.startswith("file://")


def protocol(path: str) -> str:
    return path.split("://", 1)[0]


def filesystem(path: str):
    """The fsspec file system of ``path``; a missing backend package is an error naming it."""
    import fsspec

    proto = protocol(path)
    try:
        return fsspec.filesystem(proto)
    except (ImportError, ValueError) as e:
        package = _PACKAGES.get(proto)
        fix = f"pip install {package}" if package else "install the fsspec backend for it"
        raise ConfigError(f"cannot read '{path}': no file system for '{proto}://' ({e}); {fix}, or mount the "
                          "bucket (gcsfuse, mountpoint-s3) and use the local path") from None


def explain(e: BaseException, path: str) -> UserError:
    """A UserError for a missing object or a permission problem on ``path``."""
    proto = protocol(path)
    creds = _CREDENTIALS.get(proto, "the file system's credentials")
    if isinstance(e, FileNotFoundError):
        return UserError(f"'{path}' does not exist (or the credentials in use cannot see it: {creds}); check the "
                         "path and the bucket")
    return UserError(f"permission denied reading '{path}' ({type(e).__name__}: {e}); the credentials in use cannot "
                     f"read it: set {creds} to an identity that may list and read the bucket (GCS: "
                     "storage.objects.get and .list; S3: s3:GetObject and s3:ListBucket), or mount the bucket with "
                     "gcsfuse and use the local path")


def _call(path: str, what: str, fn, *args, **kwargs):
    """fn(*args) with retries on transient errors; missing objects and permissions explained, never retried."""
    for attempt in range(RETRIES + 1):
        try:
            return fn(*args, **kwargs)
        except (FileNotFoundError, PermissionError) as e:
            raise explain(e, path) from None
        except _NOT_RETRIED:
            raise
        except Exception as e:  # noqa: BLE001 -- backends raise their own types (gcsfs HttpError, botocore ...)
            if attempt == RETRIES:
                raise RemoteReadError(
                    f"{what} '{path}' failed {RETRIES + 1} times; last error {type(e).__name__}: {e}. The bucket or "
                    "the network is unavailable: the run stops here (it resumes from its last checkpoint)") from e
            log.warning("%s '%s': %s: %s; retrying (%d of %d)", what, path, type(e).__name__, e, attempt + 1, RETRIES)
            time.sleep(BACKOFF_SECONDS * 2**attempt)


def expand(pattern: str, source: str) -> list[str]:
    """The files a remote file, directory or glob names, as full URLs, sorted."""
    fs = filesystem(pattern)
    proto = protocol(pattern)
    import glob as globlib

    if globlib.has_magic(pattern):
        found = _call(pattern, "listing", fs.glob, pattern)
        files = [f for f in found if not _call(f, "listing", fs.isdir, f)]
        if not files:
            raise ConfigError(f"source '{source}': the pattern '{pattern}' matches no file")
    elif _call(pattern, "listing", fs.isdir, pattern):
        files = _call(pattern, "listing", fs.find, pattern)
    elif _call(pattern, "listing", fs.exists, pattern):
        files = [pattern]
    else:
        raise ConfigError(f"source '{source}': '{pattern}' does not exist (or the credentials in use cannot see it: "
                          f"{_CREDENTIALS.get(proto, 'the file system credentials')})")
    return sorted(f if "://" in f else fs.unstrip_protocol(f) for f in files)


def file_size(path: str) -> int:
    if not is_remote(path):
        return os.path.getsize(path)
    return int(_call(path, "reading the size of", filesystem(path).size, path))


class RetryingFile(io.RawIOBase):
    """A remote object as a seekable raw file: ranged reads, reopened at the same byte after a transient error."""

    def __init__(self, path: str):
        super().__init__()
        self.path, self._fs = path, filesystem(path)
        self._size = file_size(path)
        self._pos, self._f = 0, None

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def _read(self, n: int) -> bytes:
        if self._f is None:
            self._f = self._fs.open(self.path, "rb", block_size=RANGE_BYTES)
        try:
            self._f.seek(self._pos)
            return self._f.read(n)
        except Exception:
            f, self._f = self._f, None  # reopen on the next try
            try:
                f.close()
            except Exception:  # noqa: BLE001 -- a broken handle may fail to close as well
                pass
            raise

    def readinto(self, b) -> int:
        n = min(len(b), self._size - self._pos)
        if n <= 0:
            return 0
        data = _call(self.path, "reading", self._read, n)
        b[: len(data)] = data
        self._pos += len(data)
        return len(data)

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._size}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def tell(self) -> int:
        return self._pos

    @property
    def size(self) -> int:
        return self._size

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None
        super().close()


def parquet_input(path: str):
    """What pyarrow's ParquetFile reads: the path itself when local, else a ranged, retrying file."""
    return open_binary(path) if is_remote(path) else path


def open_binary(path: str, buffering: int = 1 << 20):
    """A local file, or a remote object read in ranges with retries (buffered, seekable)."""
    if not is_remote(path):
        return open(path, "rb", buffering=buffering)
    return io.BufferedReader(RetryingFile(path), buffer_size=max(buffering, io.DEFAULT_BUFFER_SIZE))
