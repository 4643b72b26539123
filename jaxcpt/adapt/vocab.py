"""Tokenizer surgery: new tokens in a base tokenizer, with every existing id and segmentation kept.

``plan_extension(base_dir, spec, first_id)`` reads the new tokens from ``spec`` (a tokenizer
trained on the new domain, e.g. by ``jaxcpt train-tokenizer``: an HF directory, a
tokenizer.json or a sentencepiece .model; or a text file with one token per line, a leading
space marking a word start), in that tokenizer's priority order (merge order, or score).
Each is spelled in the base's alphabet and added to the base's BPE model with the merges
that make encoding produce it (``jaxcpt.adapt.bpe`` explains why old ids and segmentations
cannot change); a sentencepiece ``tokenizer.model`` beside it gets the same pieces at the
same ids (``jaxcpt.adapt.spm``). Candidates are skipped, and counted, when the base already
has them, when the base cannot spell them (part of a character in a sentencepiece-style
base), when the base's pre-tokenizer would cut them apart (they could never form), or when
every merge path to them would produce an existing token.

The plan also holds, for each new token, what the embedding initialisers need: the ids the
*old* tokenizer splits its string into, and the old tokens occurring in it.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from jaxcpt.adapt.bpe import BYTE_TOKEN, Alphabet, BPEModel, one_pretoken, unreachable
from jaxcpt.errors import UserError

TOKENIZER_JSON = "tokenizer.json"
SENTENCEPIECE_MODEL = "tokenizer.model"


@dataclasses.dataclass
class VocabExtension:
    first_id: int
    tokens: list[str]  # new tokens in id order (first_id, first_id + 1, ...), spelled in the base's alphabet
    texts: list[bytes]  # the UTF-8 bytes each stands for
    old_pieces: list[list[int]]  # ids the old tokenizer splits each new token's string into
    overlaps: list[list[tuple[int, float]]]  # (old id, fraction of the string covered) of old tokens inside it
    existing_ids: list[int]  # every id the old tokenizer uses
    files: dict[str, bytes]  # tokenizer files that change, by name
    report: dict  # candidates, added, intermediates, skipped (by reason), unreachable

    @property
    def end_id(self) -> int:
        return self.first_id + len(self.tokens)


def _from_tokenizer_json(tj: dict) -> list[bytes]:
    alphabet = Alphabet.of(tj) if tj.get("model", {}).get("type") == "BPE" else Alphabet(byte_level=False)
    added = {t["id"] for t in tj.get("added_tokens", [])}
    model = tj.get("model", {})
    if model.get("type") == "BPE":
        ordered = [t for t, i in sorted(model["vocab"].items(), key=lambda kv: kv[1]) if i not in added]
    elif model.get("type") == "Unigram":
        scored = [(i, piece, score) for i, (piece, score) in enumerate(model["vocab"]) if i not in added]
        ordered = [piece for _, piece, _ in sorted(scored, key=lambda x: (-x[2], x[0]))]
    else:
        raise UserError(f"cannot read new tokens from a {model.get('type')!r} tokenizer; use BPE, Unigram, "
                        "a sentencepiece .model or a text file with one token per line")
    if not alphabet.byte_level:  # byte-fallback tokens stand for bytes, not for text worth a token
        ordered = [t for t in ordered if not BYTE_TOKEN.match(t)]
    return [s for s in map(alphabet.to_surface, ordered) if s]


def _from_sentencepiece(model_file: Path) -> list[bytes]:
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(model_file.read_bytes())
    normal = [(i, p) for i, p in enumerate(proto.pieces) if p.type in (1, 4)]  # NORMAL, USER_DEFINED
    ordered = sorted(normal, key=lambda ip: (-ip[1].score, ip[0]))
    return [p.piece.replace("\u2581", " ").encode("utf-8") for _, p in ordered]


def new_token_texts(spec: str) -> tuple[list[bytes], str]:
    """(the new tokens' texts in priority order, what ``spec`` was) for a tokenizer or a token list file."""
    path = Path(spec)
    if path.is_dir():
        if (path / TOKENIZER_JSON).is_file():
            return _from_tokenizer_json(json.loads((path / TOKENIZER_JSON).read_text())), "tokenizer"
        if (path / SENTENCEPIECE_MODEL).is_file():
            return _from_sentencepiece(path / SENTENCEPIECE_MODEL), "tokenizer"
        raise UserError(f"'{path}' holds neither {TOKENIZER_JSON} nor {SENTENCEPIECE_MODEL}")
    if not path.is_file():
        raise UserError(f"--tokens '{spec}' does not exist; give a tokenizer (directory, tokenizer.json, .model) "
                        "or a text file with one token per line")
    if path.suffix == ".json":
        return _from_tokenizer_json(json.loads(path.read_text())), "tokenizer"
    if path.suffix == ".model":
        return _from_sentencepiece(path), "tokenizer"
    lines = path.read_text(encoding="utf-8").split("\n")
    return [line.rstrip("\r").encode("utf-8") for line in lines if line.rstrip("\r")], "list"


def plan_extension(base_dir: str | Path, spec: str, first_id: int, max_new_tokens: int | None = None) -> VocabExtension:
    """New tokens from ``spec`` for the tokenizer in ``base_dir``, at ids from ``first_id`` (the model's vocabulary
    size), at most ``max_new_tokens`` of them (intermediates included)."""
    from tokenizers import Tokenizer

    base_dir = Path(base_dir)
    if not (base_dir / TOKENIZER_JSON).is_file():
        raise UserError(f"the base tokenizer '{base_dir}' has no {TOKENIZER_JSON}; extend-vocab works on Hugging Face "
                        "fast tokenizers (save the tokenizer with transformers to get one)")
    base_json = json.loads((base_dir / TOKENIZER_JSON).read_text(encoding="utf-8"))
    old_tokenizer = Tokenizer.from_str(json.dumps(base_json))
    bpe = BPEModel(base_json, str(base_dir / TOKENIZER_JSON))
    if bpe.size > first_id:
        raise UserError(f"the base tokenizer uses ids up to {bpe.size - 1}, but the model has only {first_id} "
                        "embedding rows; tokenizer and model do not belong together")
    bpe.reserve(first_id)
    rule = lambda token, pending: True  # noqa: E731 - byte-level bases need no rule beyond the BPE one
    if (base_dir / SENTENCEPIECE_MODEL).is_file():
        from jaxcpt.adapt.spm import SentencePieceRule

        rule = SentencePieceRule(base_dir / SENTENCEPIECE_MODEL, bpe.vocab)
    texts, kind = new_token_texts(spec)
    limit = max_new_tokens if max_new_tokens is not None else float("inf")
    candidates, skipped = _grow(bpe, texts, rule, old_tokenizer, first_id, limit)
    tokens = list(bpe.new_tokens)
    new_json = bpe.to_json()
    files = {TOKENIZER_JSON: json.dumps(new_json, ensure_ascii=False, indent=2).encode("utf-8")}
    files.update(_slow_tokenizer_files(base_dir, new_json))
    if (base_dir / SENTENCEPIECE_MODEL).is_file():
        from jaxcpt.adapt.spm import extend_model_file

        files[SENTENCEPIECE_MODEL] = extend_model_file(base_dir / SENTENCEPIECE_MODEL,
                                                       [(first_id + i, t) for i, t in enumerate(tokens)])
    ordinary = bpe.ordinary_tokens()
    old_model = old_tokenizer.model
    missed = unreachable(new_json, tokens)
    wanted = set(texts)
    from_source = sum(1 for t in tokens if bpe.alphabet.to_surface(t) in wanted)
    report = {"source": str(spec), "source_kind": kind, "candidates": candidates, "added": len(tokens),
              "from_source": from_source, "intermediates": len(tokens) - from_source, "skipped": skipped,
              "unreachable": len(missed)}
    return VocabExtension(
        first_id=first_id, tokens=tokens, texts=[bpe.alphabet.to_surface(t) for t in tokens],
        old_pieces=[[p.id for p in old_model.tokenize(t)] for t in tokens],
        overlaps=[bpe.overlaps(t, ordinary) for t in tokens],
        existing_ids=sorted(set(old_tokenizer.get_vocab(with_added_tokens=True).values())),
        files=files, report=report)


def _grow(bpe: BPEModel, texts: list[bytes], rule, old_tokenizer, first_id: int, limit: float) -> tuple[int, dict]:
    """Add the usable ``texts`` (in order) to ``bpe`` until ``limit`` tokens; returns (candidates, skipped by reason)."""
    skipped = dict.fromkeys(("in_base", "not_spellable", "split_by_pre_tokenizer", "no_safe_merge_path"), 0)
    candidates = 0
    for text in dict.fromkeys(texts):
        token = bpe.alphabet.to_token(text)
        if token is None:
            skipped["not_spellable"] += 1
            continue
        if token in bpe.old:
            skipped["in_base"] += 1
            continue
        candidates += 1
        if token in bpe.vocab:  # added already, as an intermediate of an earlier token
            continue
        if not one_pretoken(old_tokenizer, text):
            skipped["split_by_pre_tokenizer"] += 1
            continue
        plan = bpe.chain(token, rule)
        if plan is None:
            skipped["no_safe_merge_path"] += 1
            continue
        if len(bpe.new_tokens) + len(plan) > limit:
            break
        for new in plan:
            bpe.add(new, first_id + len(bpe.new_tokens))
    return candidates, skipped


def _slow_tokenizer_files(base_dir: Path, new_json: dict) -> dict[str, bytes]:
    """vocab.json / merges.txt (GPT-2 style files some loaders read instead of tokenizer.json), when the base has them."""
    out = {}
    if (base_dir / "vocab.json").is_file():
        out["vocab.json"] = json.dumps(new_json["model"]["vocab"], ensure_ascii=False).encode("utf-8")
    if (base_dir / "merges.txt").is_file():
        lines = ["#version: 0.2"] + [f"{a} {b}" for a, b in new_json["model"]["merges"]]
        out["merges.txt"] = ("\n".join(lines) + "\n").encode("utf-8")
    return out


def write_tokenizer_files(extension: VocabExtension, base_dir: str | Path, out_dir: str | Path) -> Path:
    """The base's tokenizer companion files with the changed ones replaced, in ``out_dir``."""
    from jaxcpt.hf.convert import copy_companion_files

    out = Path(out_dir)
    copy_companion_files(base_dir, out)
    for name, content in extension.files.items():
        (out / name).write_bytes(content)
    return out
