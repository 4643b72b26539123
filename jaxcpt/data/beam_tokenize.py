"""`jaxcpt tokenize --engine beam`: tokenizing a source on Apache Beam into ArrayRecord shards.

Needs the ``jaxcpt[data]`` extra (apache-beam; see docs/data.md for the pins it brings). The
same pipeline runs on Beam's direct runner (the default: several processes on this machine),
Dataflow, Flink or Spark, with Beam's own options (``--beam-args``).

The pipeline:

1. The driver lists the source's *units* exactly as the training mixer does
   (``jaxcpt.data.sources.list_units``: files, Parquet row groups), so every format the mixer
   reads is read the same way, bad records counted by the same rules.
2. Each unit is read and tokenized by a worker; the tokenizer's files travel inside the
   pipeline (a worker needs no copy of its own), and token ids are written without BOS/EOS:
   the run adds them by its document convention, recorded in the index.
3. Unit ``k``'s documents, in their order within the unit, become shard ``shard-{k:05d}``:
   ``.array_record`` (one record per document, ids as little-endian bytes), ``.lengths.npy``
   and ``.hashes.npy`` (the text hash that decides held-out documents). A shard depends only
   on its unit, never on how a runner batched or ordered work, so the same input gives
   byte-identical shards on any runner. A unit without documents writes no shard.
4. ``jaxcpt_tokenized.json`` is written last: documents and tokens per shard, the tokenizer's
   digest and convention, the source's fingerprint and the bad records skipped.

Output directories may be local or any file system Beam knows (``gs://`` on Dataflow): shards
are written to a local temporary file and copied through Beam's ``FileSystems``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import tempfile

from jaxcpt.config import ConfigError
from jaxcpt.data.config import SourceConfig
from jaxcpt.data.sources import TOKENIZED_META
from jaxcpt.errors import UserError


def _require_beam():
    try:
        import apache_beam as beam  # noqa: F401
    except ImportError:
        raise UserError("`jaxcpt tokenize --engine beam` needs Apache Beam: pip install 'jaxcpt[data]' (docs/data.md "
                        "says which versions it brings)") from None
    return beam


def tokenizer_files(path: str) -> dict[str, bytes]:
    """The tokenizer's own files by name (a .model file, or a Hugging Face tokenizer directory's files)."""
    from jaxcpt.data.tokenize import _HF_TOKENIZER_FILES

    if os.path.isfile(path):
        names = [path]
    else:
        names = sorted(os.path.join(path, n) for n in os.listdir(path) if n in _HF_TOKENIZER_FILES or "tokenizer" in n)
    out = {}
    for name in names:
        with open(name, "rb") as f:
            out[os.path.basename(name)] = f.read()
    return out


def source_fingerprint(src: SourceConfig, units) -> str:
    """The input's identity: unit files (relative names and sizes), parts and how they are read."""
    digest = hashlib.blake2b(digest_size=8)
    root = os.path.commonpath([u.path for u in units]) if len(units) > 1 else os.path.dirname(units[0].path)
    digest.update(f"{src.text_field}|{src.text_split}\n".encode())
    for u in units:
        digest.update(f"{os.path.relpath(u.path, root)}|{u.fmt}|{u.part}|{os.path.getsize(u.path)}\n".encode())
    return digest.hexdigest()


class _TokenizeUnit:
    """unit (index, Unit) -> (index, [(ids, text hash)], {bad kind: count}); the tokenizer is loaded once per worker."""

    def __init__(self, files: dict[str, bytes], single_file: bool, source: SourceConfig, batch_size: int):
        self.files, self.single_file, self.source, self.batch_size = files, single_file, source, batch_size
        self._tok = None

    def _tokenizer(self):
        if self._tok is None:
            from jaxcpt.data.tokenize import load_tokenizer

            directory = tempfile.mkdtemp(prefix="jaxcpt_beam_tok_")
            for name, data in self.files.items():
                with open(os.path.join(directory, name), "wb") as f:
                    f.write(data)
            self._tok = load_tokenizer(os.path.join(directory, next(iter(self.files))) if self.single_file
                                       else directory)
        return self._tok

    def __call__(self, item):
        from jaxcpt.data.command import tokenize_counter, unit_documents

        index, unit = item
        counter = tokenize_counter(self.source)  # the same documents kept and skipped as `jaxcpt tokenize`
        docs = list(unit_documents(unit, self.source.text_field, self.source.text_split, counter))
        ids = []
        for start in range(0, len(docs), self.batch_size):
            ids.extend(self._tokenizer().encode_batch([text for text, _ in docs[start : start + self.batch_size]]))
        return index, [(i, h) for i, (_, h) in zip(ids, docs)], {k: v for k, v in counter.counts.items() if v}


class _WriteShard:
    """(index, docs, bad) -> shard stats; writes the shard's three files into ``output``."""

    def __init__(self, output: str, dtype: str):
        self.output, self.dtype = output, dtype

    def __call__(self, item):
        from apache_beam.io.filesystems import FileSystems

        from jaxcpt.data.indexed import write_array_record_shard

        index, docs, bad = item
        stats = {"index": index, "bad": bad, "num_documents": len(docs), "num_tokens": sum(len(i) for i, _ in docs)}
        if not docs:
            return stats
        stem = f"shard-{index:05d}"
        with tempfile.TemporaryDirectory(prefix="jaxcpt_beam_shard_") as tmp:  # written here, copied to the output
            write_array_record_shard(tmp, stem, [i for i, _ in docs], [h for _, h in docs], self.dtype)
            for name in (f"{stem}.array_record", f"{stem}.lengths.npy", f"{stem}.hashes.npy"):
                with open(os.path.join(tmp, name), "rb") as f, FileSystems.create(
                        FileSystems.join(self.output, name)) as out:
                    out.write(f.read())
        stats["stem"] = stem
        return stats


def run_beam(src: SourceConfig, tokenizer: str, output: str, *, runner: str = "direct", workers: int = 2,
             batch_size: int = 256, beam_args: str = "") -> dict:
    """Tokenize ``src`` into ArrayRecord shards in ``output`` on Beam; returns the index written."""
    beam = _require_beam()
    from apache_beam.io.filesystems import FileSystems
    from apache_beam.options.pipeline_options import PipelineOptions

    from jaxcpt.data.command import index_header, source_units, token_dtype
    from jaxcpt.data.tokenize import load_tokenizer

    if FileSystems.exists(FileSystems.join(output, TOKENIZED_META)):
        raise UserError(f"'{output}' already holds token shards; choose a new directory or delete them")
    units = source_units(src)
    facts = load_tokenizer(tokenizer).facts
    dtype = token_dtype(facts).name
    files = tokenizer_files(tokenizer)
    argv = [f"--runner={'DirectRunner' if runner == 'direct' else runner}", *shlex.split(beam_args)]
    if runner == "direct" and not any(a.startswith("--direct_running_mode") for a in argv):
        argv += ["--direct_running_mode=multi_processing", f"--direct_num_workers={max(1, workers)}"]
    FileSystems.mkdirs(output) if not FileSystems.exists(output) else None
    with beam.Pipeline(options=PipelineOptions(argv)) as p:
        stats = (
            p
            | "units" >> beam.Create(list(enumerate(units)))
            | "reshuffle" >> beam.Reshuffle()  # spread the units over workers
            | "tokenize" >> beam.Map(_TokenizeUnit(files, os.path.isfile(tokenizer), src, batch_size))
            | "write" >> beam.Map(_WriteShard(output, dtype))
            | "collect" >> beam.combiners.ToList()
        )
        stats | "index" >> beam.Map(_write_index, output=output, meta={
            **index_header(src, tokenizer, facts, dtype),
            "storage": "array_record",
            "source_fingerprint": source_fingerprint(src, units),
        })
    with FileSystems.open(FileSystems.join(output, TOKENIZED_META)) as f:
        return json.loads(f.read())


def _write_index(stats: list[dict], output: str, meta: dict) -> None:
    from apache_beam.io.filesystems import FileSystems

    stats = sorted(stats, key=lambda s: s["index"])
    bad: dict[str, int] = {}
    for s in stats:
        for k, v in s["bad"].items():
            bad[k] = bad.get(k, 0) + v
    shards = [{"stem": s["stem"], "num_documents": s["num_documents"], "num_tokens": s["num_tokens"]}
              for s in stats if s["num_documents"]]
    if not shards:
        raise ConfigError(f"no document in {meta['inputs']} (bad records: {bad or 'none'})")
    index = {**meta, "num_documents": sum(s["num_documents"] for s in shards),
             "num_tokens": sum(s["num_tokens"] for s in shards), "bad_documents": dict(sorted(bad.items())),
             "shards": shards}
    # Written once, last: its presence means the shards are complete.
    with FileSystems.create(FileSystems.join(output, TOKENIZED_META)) as f:
        f.write(json.dumps(index, indent=1, sort_keys=True).encode())
