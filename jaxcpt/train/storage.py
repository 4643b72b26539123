"""Files written whole and created once, on local disks, NFS and gs://: what the run directory's lease
and its rewritten files need from storage (see jaxcpt.train.rundir for what each guarantee is used for).

Why these are written here and not taken from a library: fsspec/etils have no create-if-absent and
no compare-and-swap, and ``flock`` is advisory and local to one kernel (NFS maps it to NLM locks a
crashed client may hold for minutes; GCS has none). Each back end uses the primitive its storage
makes atomic: ``link(2)`` and ``rename(2)`` on POSIX filesystems (NFSv3+ included), generation
preconditions on GCS.
"""

from __future__ import annotations

import os
import secrets
import tempfile
import time

from etils import epath

LEASE_NAME = "jaxcpt.lease"


# -- whole-file writes ------------------------------------------------------------------------
def write_atomically(path: epath.Path, text: str) -> None:
    """Replace ``path`` with ``text``: a temporary sibling, fsync'd, renamed over it (local and NFS);
    on object stores (gs://) an object appears only once its upload is complete, so a plain write is whole."""
    path = epath.Path(path)
    if is_remote(path):
        path.write_text(text)
        return
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=str(path.parent))
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, str(path))
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    _fsync_directory(str(path.parent))  # the rename itself survives a power loss


def _fsync_directory(directory: str) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some filesystems refuse fsync on directories; the rename is still atomic
        pass
    finally:
        os.close(fd)


def is_remote(path) -> bool:
    return "://" in str(path)


# -- storage back ends for the lease -----------------------------------------------------------
class _TextVersioned:
    """A lease file whose ``version`` is its text: read it, refresh and delete it only while it is ours."""

    def read(self) -> tuple[str | None, str | None]:
        try:
            text = self._read_text()
        except FileNotFoundError:
            return None, None
        return text, text

    def refresh(self, text: str, version: str) -> bool:
        """Our own lease's new heartbeat: only while it is still the one we wrote."""
        if self.read()[1] != version:
            return False
        self._write_text(text)
        return True

    def delete(self, version: str) -> None:
        if self.read()[1] == version:
            self._unlink()


class _LocalLeaseFile(_TextVersioned):
    """A lease on a POSIX filesystem (local or NFS); ``version`` is the file's text."""

    atomic = True

    def __init__(self, path: epath.Path):
        self.path = str(path)

    def create(self, text: str) -> bool:
        fd, tmp = tempfile.mkstemp(prefix=f".{LEASE_NAME}.new-", dir=os.path.dirname(self.path))
        try:
            with os.fdopen(fd, "w") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
            os.link(tmp, self.path)  # atomic create-if-absent, of a complete file
            return True
        except FileExistsError:
            return False
        finally:
            os.unlink(tmp)

    def _read_text(self) -> str:
        with open(self.path) as f:
            return f.read()

    def _write_text(self, text: str) -> None:
        write_atomically(epath.Path(self.path), text)

    def take_over(self, text: str, version: str) -> bool:
        """Replace a stale lease (judged from ``version``). The rename aside is atomic, so of two
        launches taking over at once only one moves it; the other sees it gone and starts again."""
        aside = f"{self.path}.taken-{secrets.token_hex(4)}"
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return False
        with open(aside) as f:
            moved = f.read()
        if moved != version:  # refreshed between our read and the rename: it is alive, put it back
            try:
                os.link(aside, self.path)
            except FileExistsError:
                pass
            os.unlink(aside)
            return False
        os.unlink(aside)
        return self.create(text)

    def _unlink(self) -> None:
        os.unlink(self.path)


class _GCSLeaseFile:
    """A lease object on GCS with generation preconditions (google-cloud-storage); ``version`` is the generation."""

    atomic = True

    def __init__(self, path: epath.Path):
        from google.cloud import storage  # noqa: F401 - checked by the caller

        bucket, _, name = str(path).split("://", 1)[1].partition("/")
        self.blob_name, self.bucket_name = name, bucket
        self.client = storage.Client()

    def _blob(self):
        return self.client.bucket(self.bucket_name).blob(self.blob_name)

    def _upload(self, text: str, generation: int) -> bool:
        from google.api_core.exceptions import PreconditionFailed

        try:
            self._blob().upload_from_string(text, content_type="application/json", if_generation_match=generation)
            return True
        except PreconditionFailed:
            return False

    def create(self, text: str) -> bool:
        return self._upload(text, 0)  # generation 0: only if no live object has this name

    def read(self) -> tuple[str | None, int | None]:
        from google.api_core.exceptions import NotFound

        blob = self.client.bucket(self.bucket_name).get_blob(self.blob_name)
        if blob is None:
            return None, None
        try:
            return blob.download_as_text(if_generation_match=blob.generation), blob.generation
        except NotFound:
            return None, None

    def refresh(self, text: str, version: int) -> bool:
        return self._upload(text, version)

    def take_over(self, text: str, version: int) -> bool:
        return self._upload(text, version)

    def delete(self, version: int) -> None:
        from google.api_core.exceptions import NotFound, PreconditionFailed

        try:
            self._blob().delete(if_generation_match=version)
        except (NotFound, PreconditionFailed):
            pass


class _BestEffortLeaseFile(_TextVersioned):
    """Any other epath URL: write, pause, read back. Not atomic (see the module docstring)."""

    atomic = False
    settle_s = 2.0

    def __init__(self, path: epath.Path):
        self.path = epath.Path(path)

    def _write_and_confirm(self, text: str) -> bool:
        self.path.write_text(text)
        time.sleep(self.settle_s)
        return self.read()[0] == text

    def create(self, text: str) -> bool:
        return False if self.path.exists() else self._write_and_confirm(text)

    def _read_text(self) -> str:
        return self.path.read_text()

    def _write_text(self, text: str) -> None:
        self.path.write_text(text)

    def _unlink(self) -> None:
        self.path.unlink()

    def take_over(self, text: str, version: str) -> bool:
        return self.read()[1] == version and self._write_and_confirm(text)


def lease_file(path: epath.Path):
    if not is_remote(path):
        return _LocalLeaseFile(path)
    if str(path).startswith(("gs://", "gcs://")):
        try:
            return _GCSLeaseFile(path)
        except ImportError:
            pass
    print(f"warning: the lease {path} cannot be created atomically (for gs:// install google-cloud-storage); two "
          "launches started within seconds of each other may both run", flush=True)
    return _BestEffortLeaseFile(path)
