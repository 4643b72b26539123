"""Files a run's checkpoints keep beside their steps: the tokenizer, stored once, by content.

A checkpoint must resume on its own (the run directory and the model's source may both be
gone), so it needs the run's tokenizer. Re-encoding it into every step would cost a copy per
save, and a copy of *every* file next to it: an HF start's tokenizer directory is the model
directory, weights included (issue 19: 1.3 GiB of base64 JSON per checkpoint of a 0.5B start).
So the tokenizer is written once, into a content-addressed store beside the steps::

    CKPT/tokenizers/<digest>/tokenizer.json ...   the named TOKENIZER_FILES only, never weights
    CKPT/1200/files                               JSON: {"format": 2, "data_tokenizer": {"bundle": <digest>,
                                                  "sha256": {name: sha256}, ...}, "export_tokenizer": {...}}

A bundle is kept while any step refers to it (``remove_unreferenced_bundles``), and read only
after each file's sha256 matches the step's reference, so a damaged copy is named, never used.

Every name read from a checkpoint is checked (``check_stored_name``) before anything is
written: a checkpoint from a shared bucket must not write outside its target directory.
Checkpoints written before this format (``files`` holding base64 file contents) still read.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import logging
import os
import shutil
import tempfile
import uuid
import weakref

from etils import epath

from jaxcpt.errors import UserError

log = logging.getLogger(__name__)

FILES_FORMAT = 2  # the 'files' item refers to bundles; checkpoints without the key hold base64 contents
STORE = "tokenizers"  # CKPT/tokenizers/<digest>: beside the step directories (Orbax ignores non-numeric names)

# The files of a Hugging Face tokenizer, by name. Nothing else is ever stored: a model
# directory also holds weights, configs and code.
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json", "added_tokens.json",
    "vocab.json", "vocab.txt", "merges.txt", "spiece.model", "sentencepiece.bpe.model",
    "chat_template.jinja", "chat_template.json",
    # Not the tokenizer, but exports ship it with the tokenizer (COMPANION_FILES): the source's stop
    # tokens and sampling defaults, which a resume from the checkpoint alone would otherwise lose.
    "generation_config.json",
)
CHAT_TEMPLATE_DIR = "additional_chat_templates"  # transformers saves named chat templates there as NAME.jinja


class UnsafeCheckpointError(UserError, ValueError):
    """A checkpoint names a file that would be written outside its target directory (or is not a
    tokenizer file): refused, never written."""


def check_stored_name(name: object, where: str, *, allow_unlisted: bool = False) -> str:
    """``name`` if it is a safe relative file name jaxcpt may store, else UnsafeCheckpointError.

    Safe: a bare file name (no separators, not '.' or '..', nothing absolute), or
    ``additional_chat_templates/NAME.jinja``. Unless ``allow_unlisted``, it must also be one of
    TOKENIZER_FILES (or a chat template in that directory).
    """
    ok = isinstance(name, str) and name and "\\" not in name and "\0" not in name and not os.path.isabs(name)
    parts = name.split("/") if ok else []
    ok = ok and all(part not in ("", ".", "..") for part in parts) and (
        len(parts) == 1 or (len(parts) == 2 and parts[0] == CHAT_TEMPLATE_DIR and parts[1].endswith(".jinja")))
    if not ok:
        raise UnsafeCheckpointError(
            f"{where} names a file {name!r}, which would be written outside its directory; refusing to read it. "
            "A jaxcpt checkpoint only stores plain tokenizer file names: this one was altered or not written by "
            "jaxcpt. Resume from a checkpoint you trust, or set data.tokenizer and remove the step.")
    if not allow_unlisted and len(parts) == 1 and name not in TOKENIZER_FILES:
        raise UnsafeCheckpointError(
            f"{where} names a file {name!r}, which is not a tokenizer file jaxcpt stores "
            f"({', '.join(TOKENIZER_FILES)}); refusing to read it. Resume from a checkpoint you trust.")
    return name


def tokenizer_file_names(directory: str | os.PathLike) -> list[str]:
    """The TOKENIZER_FILES (and additional chat templates) present in ``directory``, sorted."""
    d = epath.Path(directory)
    names = [n for n in TOKENIZER_FILES if (d / n).is_file()]
    templates = d / CHAT_TEMPLATE_DIR
    if templates.is_dir():
        names += [f"{CHAT_TEMPLATE_DIR}/{p.name}" for p in templates.iterdir() if p.name.endswith(".jinja") and p.is_file()]
    return sorted(names)


def _sha256(path: epath.Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclasses.dataclass(frozen=True)
class Bundle:
    """Files stored once under CKPT/tokenizers/<digest>, named by the digest of their names and contents."""

    digest: str
    sha256: dict  # {name: sha256 hex}
    sources: dict = dataclasses.field(default_factory=dict, compare=False)  # {name: path} when writing

    def reference(self) -> dict:
        return {"bundle": self.digest, "sha256": dict(self.sha256)}


def bundle_of(paths: dict[str, str | os.PathLike]) -> Bundle:
    """The bundle of ``{name: path}`` (the files are hashed, not copied)."""
    sha = {name: _sha256(epath.Path(path)) for name, path in sorted(paths.items())}
    digest = hashlib.sha256("".join(f"{n}\0{s}\n" for n, s in sha.items()).encode()).hexdigest()[:32]
    return Bundle(digest, sha, {n: str(p) for n, p in paths.items()})


@dataclasses.dataclass
class FilesItem:
    """A run's ``files`` item: the small JSON saved into every step, and the bundles it refers to,
    written (once, by process 0) before the first step that refers to them."""

    item: dict
    bundles: list[Bundle]


class DamagedStoreError(UserError, OSError):
    """A stored bundle's file is missing or does not match the digest a step records."""


def verify_bundle(directory: epath.Path, sha256: dict) -> None:
    for name, expected in sha256.items():
        path = directory / name
        if not path.is_file():
            raise DamagedStoreError(f"'{path}' is missing (the checkpoint's stored tokenizer is incomplete)")
        if _sha256(path) != expected:
            raise DamagedStoreError(f"'{path}' does not match the digest the checkpoint records (it is damaged)")


def write_bundle(checkpoint_dir: epath.Path, bundle: Bundle) -> epath.Path:
    """CKPT/tokenizers/<digest>, written unless a complete copy is there already.

    Written into a temporary name and renamed, so a save killed halfway leaves no half bundle
    under the final name (on GCS, where a rename is a copy, readers verify every file anyway).
    """
    target = checkpoint_dir / STORE / bundle.digest
    try:
        verify_bundle(target, bundle.sha256)
        return target
    except DamagedStoreError:
        pass
    staging = checkpoint_dir / STORE / f".{bundle.digest}.tmp-{uuid.uuid4().hex[:8]}"
    for name in bundle.sha256:
        (staging / name).parent.mkdir(parents=True, exist_ok=True)
        (staging / name).write_bytes(epath.Path(bundle.sources[name]).read_bytes())
    verify_bundle(staging, bundle.sha256)  # the source changed while being copied: fail now, not at resume
    if target.exists():  # an incomplete or damaged earlier copy
        target.rmtree()
    staging.rename(target)
    return target


def bundle_dir(checkpoint_dir: epath.Path, reference: dict, scratch: ScratchDirs | None = None) -> epath.Path:
    """The verified directory of a stored bundle: in place on a local disk, else copied into a
    scratch directory (tokenizer libraries read local files only)."""
    source = checkpoint_dir / STORE / reference["bundle"]
    verify_bundle(source, reference["sha256"])
    if "://" not in str(checkpoint_dir):
        return source
    local = epath.Path((scratch or EXIT_SCRATCH).make())
    for name in reference["sha256"]:
        (local / name).parent.mkdir(parents=True, exist_ok=True)
        (local / name).write_bytes((source / name).read_bytes())
    verify_bundle(local, reference["sha256"])
    return local


def referenced_bundles(files_item: dict) -> set[str]:
    if files_item.get("format") != FILES_FORMAT:
        return set()
    return {ref["bundle"] for key in ("data_tokenizer", "export_tokenizer") if (ref := files_item.get(key))}


def remove_unreferenced_bundles(checkpoint_dir: epath.Path, keep: set[str]) -> list[str]:
    """Delete bundles (and leftover staging copies) that no step refers to; returns their names."""
    store = checkpoint_dir / STORE
    removed = []
    if store.is_dir():
        for entry in store.iterdir():
            if entry.name not in keep:
                entry.rmtree() if entry.is_dir() else entry.unlink()
                removed.append(entry.name)
    return removed


def check_files_item(item: object, where: str) -> dict:
    """The ``files`` item of a checkpoint, checked: its structure (a malformed one is damage:
    ValueError) and every name in it (UnsafeCheckpointError)."""
    if not isinstance(item, dict):
        raise ValueError(f"the files item is a {type(item).__name__}, not a JSON object")
    where = f"checkpoint '{where}' (its files item)"
    if item.get("format") == FILES_FORMAT:
        for key in ("data_tokenizer", "export_tokenizer"):
            ref = item.get(key)
            if ref is None:
                continue
            if not (isinstance(ref, dict) and isinstance(ref.get("bundle"), str) and isinstance(ref.get("sha256"), dict)):
                raise ValueError(f"the files item's {key} is malformed")
            if not ref["bundle"].isalnum():
                raise UnsafeCheckpointError(f"{where} names a stored bundle {ref['bundle']!r}; refusing to read it")
            single_file = key == "data_tokenizer" and ref.get("kind") == "file"
            for name in ref["sha256"]:
                check_stored_name(name, where, allow_unlisted=single_file)
            if single_file and list(ref["sha256"]) != [ref.get("name")]:
                raise ValueError("the files item's data_tokenizer names another file than it stores")
        return item
    # The format before FILES_FORMAT: {'data_tokenizer': {'kind', 'name', 'files': {name: base64}},
    # 'export_tokenizer': {name: base64}}. Its export copy held every file of the source directory.
    data = item.get("data_tokenizer")
    if data is not None:
        check_stored_name(data.get("name"), where, allow_unlisted=True)
        for name in data.get("files", {}):
            check_stored_name(name, where, allow_unlisted=True)
    for name in item.get("export_tokenizer") or {}:
        check_stored_name(name, where, allow_unlisted=True)
    return item


def decode_legacy(encoded: dict[str, str], directory: str | os.PathLike, *, only_tokenizer_files: bool) -> epath.Path:
    """Write base64 ``{name: contents}`` of an old checkpoint into ``directory``; with
    ``only_tokenizer_files`` the other files it holds (weights, configs) are left out."""
    out = epath.Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    for name, data in encoded.items():
        check_stored_name(name, f"'{out}'", allow_unlisted=True)
        if only_tokenizer_files and name not in TOKENIZER_FILES:
            continue
        (out / name).write_bytes(base64.b64decode(data))
    return out


class ScratchDirs:
    """Temporary local directories (a remote or old checkpoint's tokenizer, a converted one), removed
    by ``close()``, or when this object is collected or the interpreter exits, whichever comes first."""

    def __init__(self, prefix: str = "jaxcpt-tokenizer-"):
        self.prefix = prefix
        self._finalizers: list[weakref.finalize] = []

    def make(self) -> str:
        path = tempfile.mkdtemp(prefix=self.prefix)
        self._finalizers.append(weakref.finalize(self, shutil.rmtree, path, True))
        return path

    def close(self) -> None:
        for remove in self._finalizers:
            remove()  # a finalizer runs once: later calls (and the one at exit) do nothing
        self._finalizers.clear()


EXIT_SCRATCH = ScratchDirs()  # for commands that hand a tokenizer directory on (export, merge): removed at exit
