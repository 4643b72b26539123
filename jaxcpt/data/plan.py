"""What a data stream needs, resolved once at build time: this host's files (cut into units),
the special tokens the tokenizer adds, held-out documents, and the fingerprint a saved
stream position is checked against (``jaxcpt.data.pipeline``, ``decontaminate``, ``elastic``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os

from jaxcpt.config import ConfigError, to_dict
from jaxcpt.data.config import DataConfig
from jaxcpt.data.documents import BadInputCounter, HeldOut, first_document_hashes
from jaxcpt.data.readers import ReadLimits
from jaxcpt.data.remote import file_size
from jaxcpt.data.shares import split_units
from jaxcpt.data.sources import TOKENIZED_META, Unit, list_units, read_tokenized_meta, resolve_files
from jaxcpt.data.tokenize import tokenizer_facts, tokenizer_fingerprint


@dataclasses.dataclass(frozen=True)
class _Plan:
    """What a stream needs, resolved once at build time (files, held-out hashes, special tokens)."""

    cfg: DataConfig
    seq_len: int
    process_index: int
    process_count: int
    units: list[list[Unit]]  # per source
    eval_hashes: list[frozenset[int] | None]  # per source; set for eval_documents splits
    held_out_anywhere: HeldOut  # every source's held-out documents: no source trains on them
    bos_id: int | None
    eos_id: int | None
    fingerprint: dict


def _host(process_index: int | None, process_count: int | None) -> tuple[int, int]:
    if process_index is None or process_count is None:
        import jax  # only when not injected: tests and tools simulate hosts without jax

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    if not 0 <= process_index < process_count:
        raise ConfigError(f"process_index {process_index} is not in [0, {process_count})")
    return process_index, process_count


def _counter(cfg: DataConfig, name: str) -> BadInputCounter:
    return BadInputCounter(
        name,
        fatal=cfg.fatal_bad_input,
        max_fraction=cfg.max_bad_fraction,
        min_records=cfg.bad_input_min_documents,
        warn_seconds=cfg.bad_input_warn_seconds,
    )


def _limits(cfg: DataConfig) -> ReadLimits:
    return ReadLimits(max_document_bytes=cfg.max_document_bytes, parquet_batch_bytes=cfg.parquet_batch_bytes)


def _special_tokens(cfg: DataConfig, files: list[list[str]]) -> tuple[int | None, int | None, str]:
    """(BOS id to add, EOS id to add, tokenizer fingerprint): BOS as the tokenizer adds it and EOS
    where it has one, unless data.add_bos / add_eos say otherwise. Without a tokenizer, the facts
    come from the token shards."""
    metas = [
        read_tokenized_meta(os.path.dirname(f)) for fs in files for f in fs if os.path.basename(f) == TOKENIZED_META
    ]
    has_text = any(os.path.basename(f) != TOKENIZED_META for fs in files for f in fs)
    if cfg.tokenizer:
        facts = tokenizer_facts(cfg.tokenizer)
        bos, eos, adds = facts.bos_id, facts.eos_id, facts.document_convention
        fingerprint, where = tokenizer_fingerprint(cfg.tokenizer), f"tokenizer '{cfg.tokenizer}'"
        for meta in metas:
            if meta["tokenizer_fingerprint"] != fingerprint:
                raise ConfigError(
                    f"token shards '{meta['directory']}' were written with tokenizer '{meta['tokenizer']}', not "
                    f"data.tokenizer '{cfg.tokenizer}'; re-run `jaxcpt tokenize` or point data.tokenizer at it"
                )
    elif has_text or not metas:
        raise ConfigError(
            "data.tokenizer is empty but some sources hold text (or there is no source); set it to a sentencepiece "
            ".model file or a tokenizer directory"
        )
    else:
        fingerprints = {m["tokenizer_fingerprint"] for m in metas}
        if len(fingerprints) > 1:
            raise ConfigError(
                f"token shards of different tokenizers are mixed: {sorted(m['directory'] for m in metas)}"
            )
        meta = metas[0]
        bos, eos, fingerprint = meta["bos_id"], meta["eos_id"], meta["tokenizer_fingerprint"]
        # Shards written before the tokenizer's convention was recorded: BOS and EOS where they exist.
        adds = (meta.get("adds_bos", bos is not None), meta.get("adds_eos", eos is not None))
        where = f"tokenizer '{meta['tokenizer']}' (of the shards in '{meta['directory']}')"
    added = []
    for flag, token, default, name in ((cfg.add_bos, bos, adds[0], "bos"), (cfg.add_eos, eos, adds[1], "eos")):
        if flag and token is None:
            raise ConfigError(
                f"data.add_{name}=true, but the {where} has no {name.upper()} token; set data.add_{name}=false, or "
                "leave it unset (null) to follow the tokenizer"
            )
        added.append(token if (default if flag is None else flag) else None)
    return added[0], added[1], fingerprint


def resolved_special_tokens(cfg: DataConfig) -> tuple[int | None, int | None]:
    """The (BOS, EOS) ids the pipeline adds to every document (None: not added), after
    data.add_bos / add_eos fall back to the tokenizer's convention (or the shards' without one)."""
    files = [resolve_files(s.paths, s.name, s.format) for s in cfg.sources]
    bos, eos, _ = _special_tokens(cfg, files)
    return bos, eos


def _units_fingerprint(units: list[Unit]) -> str:
    root = os.path.commonpath([u.path for u in units]) if len(units) > 1 else os.path.dirname(units[0].path)
    digest = hashlib.blake2b(digest_size=8)
    for unit in units:  # relative paths and sizes: moving the corpus keeps positions valid, editing it does not
        line = f"{os.path.relpath(unit.path, root)}|{unit.part}|{file_size(unit.path)}"
        if (unit.begin, unit.end) != (0, None):  # a range (split_units): another split is another stream
            line += f"|{unit.begin}:{unit.end}"
        digest.update(f"{line}\n".encode())
    return digest.hexdigest()


def excluded_hashes(cfg: DataConfig) -> frozenset[int]:
    """data.exclude_documents: text hashes no source trains on (jaxcpt decontaminate --write-hashes)."""
    if not cfg.exclude_documents:
        return frozenset()
    try:
        with open(cfg.exclude_documents) as f:
            data = json.load(f)
        if data.get("format") != "jaxcpt-exclude-v1":
            raise ValueError(f"format {data.get('format')!r}, expected 'jaxcpt-exclude-v1'")
        return frozenset(int(h, 16) for h in data["text_hashes"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise ConfigError(f"data.exclude_documents '{cfg.exclude_documents}' cannot be read ({e}); write it with "
                          "`jaxcpt decontaminate --write-hashes FILE`") from None


def _default_instruction(key: str, value) -> bool:
    """Instruction keys at their defaults stay out of the fingerprint: states saved before they existed still fit."""
    return (key, value) in (("instruction", "none"), ("loss_on", "answer"), ("min_doc_tokens", 0))


def _check_instruction_sources(cfg: DataConfig, units: list[list[Unit]]) -> None:
    for s, u in zip(cfg.sources, units):
        if s.instruction == "none":
            continue
        other = sorted({x.fmt for x in u} - {"jsonl", "parquet"})
        if other:
            raise ConfigError(f"source '{s.name}' (instruction: {s.instruction}) reads {other} files; instruction "
                              "records are read from JSONL or Parquet (token shards hold no loss mask)")
        if s.instruction == "messages":
            from jaxcpt.data.chat import require_chat_template
            from jaxcpt.data.tokenize import cached_tokenizer

            require_chat_template(cached_tokenizer(cfg.tokenizer), cfg.tokenizer, s.name)


def _plan(cfg: DataConfig, seq_len: int | None, process_index: int | None, process_count: int | None) -> _Plan:
    if not cfg.sources:
        raise ConfigError("data.sources is empty: add at least one source (name, paths)")
    seq_len = cfg.seq_len if seq_len is None else int(seq_len)
    if seq_len < 2:
        raise ConfigError(f"seq_len must be >= 2, got {seq_len}")
    process_index, process_count = _host(process_index, process_count)
    files = [resolve_files(s.paths, s.name, s.format) for s in cfg.sources]
    units = [
        split_units(
            list_units(f, s.format, s.text_field, s.name, s.instruction),
            hosts=process_count,
            workers=max(1, cfg.num_workers),
            text_split=s.text_split,
            source=s.name,
        )
        for f, s in zip(files, cfg.sources)
    ]
    bos, eos, tok_fingerprint = _special_tokens(cfg, files)
    _check_instruction_sources(cfg, units)
    eval_hashes = []
    for s, u in zip(cfg.sources, units):
        if s.eval_documents > 0:
            kw = dict(source=s.name, units=u, text_field=s.text_field, text_split=s.text_split, count=s.eval_documents,
                      instruction=s.instruction)
            hashes = first_document_hashes(**kw, counter=_counter(cfg, s.name), limits=_limits(cfg))
            eval_hashes.append(frozenset(hashes))
        else:
            eval_hashes.append(None)
    held_out_anywhere = HeldOut(
        threshold=max(int(s.eval_fraction * 2**64) for s in cfg.sources),
        hashes=frozenset().union(*(h for h in eval_hashes if h is not None), excluded_hashes(cfg)),
    )
    stream_keys = (
        "packing",
        "packing_bins",
        "seed",
        "shuffle_buffer",
        "shuffle_files",
        "num_workers",
        "tokenize_batch_size",
    )
    fingerprint = {
        **{k: getattr(cfg, k) for k in stream_keys},
        "add_bos": bos is not None,  # resolved: an unset flag and the tokenizer's convention are the same stream
        "add_eos": eos is not None,
        "seq_len": seq_len,
        "process_count": process_count,
        "process_index": process_index,
        "tokenizer": tok_fingerprint,
        **({"excluded": len(held_out_anywhere.hashes)} if cfg.exclude_documents else {}),
        "sources": [
            {**{k: v for k, v in to_dict(s).items()
                if k not in ("paths", "weight", "loss_weight") and not _default_instruction(k, v)},
             "files": _units_fingerprint(u)}
            for s, u in zip(cfg.sources, units)
        ],
    }
    return _Plan(
        cfg, seq_len, process_index, process_count, units, eval_hashes, held_out_anywhere, bos, eos, fingerprint
    )
