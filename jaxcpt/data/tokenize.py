"""Tokenizers (sentencepiece or a local Hugging Face directory) and the tokenizing pipeline stage.

``load_tokenizer(path)`` returns an object with ``encode(text) -> list[int]``,
``encode_batch(texts) -> list[list[int]]`` and ``facts``, a ``TokenizerFacts``: the special
token ids, whether the tokenizer itself adds BOS/EOS, and how many ids it can emit.
``tokenizer_facts(path)`` gives those facts for a path, which is what the trainer checks the
model against. Encoding never adds special tokens: BOS/EOS are added by the pipeline, by
default exactly where the tokenizer's own convention puts them (``data.add_bos`` /
``data.add_eos``).

``TokenizeDataset`` pulls a batch of documents from its parent, tokenizes them in one
call (per-call overhead dominates short documents), adds BOS/EOS, and yields the pieces
``split_fn`` cuts each document into. Its state is the parent's state before the batch
plus the number of pieces already yielded, so restoring re-tokenizes at most one batch.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import os
from collections.abc import Callable

import grain
import numpy as np

from jaxcpt.data.documents import EpochEnd
from jaxcpt.errors import UserError


@dataclasses.dataclass(frozen=True)
class TokenizerFacts:
    """What a tokenizer is, as far as the trainer and the pipeline care."""

    bos_id: int | None
    eos_id: int | None
    pad_id: int | None
    adds_bos: bool  # the tokenizer's own convention prepends bos_id (tokenizer(text) does, for HF)
    adds_eos: bool  # ... appends eos_id
    num_ids: int  # one more than the largest id it can ever emit (added and special tokens counted)
    kind: str  # 'sentencepiece' | 'huggingface'

    @property
    def document_convention(self) -> tuple[bool, bool]:
        """(add BOS, add EOS) around every training document when data.add_bos / add_eos are unset.

        BOS as the tokenizer adds it (what the model saw before). EOS wherever the tokenizer has
        one: HF tokenizers append nothing because they are set up for prompts, but pretraining
        ends every document with EOS (Llama 3's <|end_of_text|>, Qwen's <|endoftext|>), and a model
        continued without it forgets where documents stop and generates on and on.
        """
        return self.adds_bos, self.eos_id is not None


class SentencePieceTokenizer:
    kind = "sentencepiece"

    def __init__(self, path: str):
        import sentencepiece as spm

        self.path = path
        self._sp = spm.SentencePieceProcessor(model_file=path)
        bos, eos = _id_or_none(self._sp.bos_id()), _id_or_none(self._sp.eos_id())
        # A bare .model file carries no convention of its own (sentencepiece adds nothing unless
        # asked); jaxcpt's for it is what it always was: BOS and EOS around every document,
        # each where the model defines the token.
        self.facts = TokenizerFacts(
            bos_id=bos,
            eos_id=eos,
            pad_id=_id_or_none(self._sp.pad_id()),
            adds_bos=bos is not None,
            adds_eos=eos is not None,
            num_ids=int(self._sp.get_piece_size()),
            kind=self.kind,
        )

    def encode(self, text: str) -> list[int]:
        return self._sp.encode(text, out_type=int)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        # One thread: parallelism comes from Grain workers, and more threads per worker would
        # oversubscribe the cores the trainer also needs.
        return self._sp.encode(texts, out_type=int, num_threads=1)

    def token_bytes(self) -> np.ndarray:
        """[num_ids] UTF-8 bytes each id spells: '▁' is a space, <0xNN> one byte, control tokens none."""
        sp = self._sp
        out = np.zeros(self.facts.num_ids, np.int32)
        for i in range(sp.get_piece_size()):
            if sp.is_control(i) or sp.is_unknown(i):
                continue
            out[i] = 1 if sp.is_byte(i) else len(sp.id_to_piece(i).replace("\u2581", " ").encode("utf-8"))
        return out


class HFTokenizer:
    kind = "huggingface"

    def __init__(self, path: str):
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # workers are the parallelism
        from transformers import AutoTokenizer

        self.path = path
        try:
            self._tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
        except (OSError, ValueError) as e:
            raise UserError(f"cannot load the Hugging Face tokenizer in '{path}': {e}") from None
        self._fast = getattr(self._tok, "backend_tokenizer", None)
        bos, eos, pad = self._tok.bos_token_id, self._tok.eos_token_id, self._tok.pad_token_id
        adds_bos, adds_eos = _added_special_tokens(self._tok, bos, eos)
        ids = [*self._tok.get_vocab().values(), *(i for i in (bos, eos, pad) if i is not None)]
        self.facts = TokenizerFacts(
            bos_id=bos,
            eos_id=eos,
            pad_id=pad,
            adds_bos=adds_bos,
            adds_eos=adds_eos,
            num_ids=max(ids, default=-1) + 1,
            kind=self.kind,
        )

    def encode(self, text: str) -> list[int]:
        return self.encode_batch([text])[0]

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        if self._fast is not None:
            # The Rust tokenizer directly, without offsets: the Python wrapper's per-call
            # bookkeeping costs more than tokenizing short documents.
            encode = getattr(self._fast, "encode_batch_fast", self._fast.encode_batch)
            return [e.ids for e in encode(texts, add_special_tokens=False)]
        return self._tok(texts, add_special_tokens=False)["input_ids"]

    def token_bytes(self) -> np.ndarray:
        """[num_ids] UTF-8 bytes each id spells; special and added tokens spell none.

        Byte-level BPE (GPT-2, Llama 3, Qwen): every character of a token stands for one byte.
        Sentencepiece-style vocabularies (Llama 2, Gemma): '▁' is a space, <0xNN> one byte.
        """
        vocab = self._tok.get_vocab()
        out = np.zeros(self.facts.num_ids, np.int32)
        decoder = type(getattr(self._fast, "decoder", None)).__name__ if self._fast is not None else ""
        byte_level = "ByteLevel" in decoder or "ByteLevel" in repr(getattr(self._fast, "decoder", ""))
        special = set(self._tok.all_special_ids) | {i for i, t in self._tok.added_tokens_decoder.items() if t.special}
        for token, i in vocab.items():
            if i in special or i >= len(out):
                continue
            if byte_level:
                out[i] = len(token)
            elif len(token) == 6 and token.startswith("<0x") and token.endswith(">"):
                out[i] = 1
            else:
                out[i] = len(token.replace("\u2581", " ").encode("utf-8"))
        return out


def _id_or_none(i: int) -> int | None:
    return int(i) if i is not None and i >= 0 else None


def _added_special_tokens(tok, bos: int | None, eos: int | None) -> tuple[bool, bool]:
    """(adds BOS, adds EOS): what ``tok(text)`` puts around a text with add_special_tokens=True.

    Measured by calling the tokenizer rather than read from ``add_bos_token``: the
    post-processor in tokenizer.json is what transformers runs, and the attribute does not
    always agree with it (a Llama tokenizer reloaded by transformers 5 reports
    add_bos_token=False while its post-processor prepends <s>).
    """
    probe = "a b"
    plain = tok(probe, add_special_tokens=False)["input_ids"]
    full = tok(probe, add_special_tokens=True)["input_ids"]
    prefix, suffix = full[:1], full[-1:]  # if the text's own tokens change, look at the ends only
    for start in range(len(full) - len(plain) + 1):
        if full[start : start + len(plain)] == plain:
            prefix, suffix = full[:start], full[start + len(plain) :]
            break
    return bos is not None and bos in prefix, eos is not None and eos in suffix


def load_tokenizer(path: str) -> SentencePieceTokenizer | HFTokenizer:
    """A sentencepiece ``.model`` file, or a local Hugging Face tokenizer directory."""
    if not path:
        raise UserError(
            "no tokenizer given: set data.tokenizer to a sentencepiece .model file or a tokenizer directory"
        )
    if os.path.isdir(path):
        return HFTokenizer(path)
    if os.path.isfile(path):
        return SentencePieceTokenizer(path)
    raise UserError(
        f"tokenizer '{path}' does not exist (expected a sentencepiece .model file or a tokenizer directory)"
    )


_HF_TOKENIZER_FILES = ("special_tokens_map.json", "added_tokens.json", "vocab.json", "vocab.txt", "merges.txt")


def tokenizer_fingerprint(path: str) -> str:
    """A short hash of the tokenizer's files: resuming or reusing shards with another tokenizer is an error."""
    if not path:
        return ""
    digest = hashlib.blake2b(digest_size=8)
    if os.path.isfile(path):
        files = [path]
    else:  # only the tokenizer's own files: a model directory also holds config.json, weights ...
        files = sorted(os.path.join(path, n) for n in os.listdir(path) if n in _HF_TOKENIZER_FILES or "tokenizer" in n)
    for name in files:
        with open(name, "rb") as f:
            digest.update(os.path.basename(name).encode())
            digest.update(f.read())
    return digest.hexdigest()


_LOADED: dict[str, object] = {}


def cached_tokenizer(path: str):
    """One tokenizer per path and process: each Grain worker loads its own instead of unpickling one."""
    if path not in _LOADED:
        _LOADED[path] = load_tokenizer(path)
    return _LOADED[path]


@functools.lru_cache(maxsize=8)
def token_byte_lengths(path: str) -> np.ndarray:
    """[num_ids] int32: the UTF-8 bytes of text each token id spells, for bits per byte.

    Summed over a document's tokens this is the document's byte length (sentencepiece
    models count the one-space prefix they add); BOS/EOS/padding count 0. Bits per byte
    compare models with different tokenizers, e.g. before and after a vocabulary extension.
    """
    return cached_tokenizer(path).token_bytes()


def tokenizer_facts(path: str) -> TokenizerFacts:
    """The facts of the tokenizer at ``path`` (a sentencepiece .model file or an HF directory)."""
    return cached_tokenizer(path).facts


def check_tokenizer_fits_model(path: str, vocab_size: int, min_fraction: float) -> TokenizerFacts:
    """The tokenizer's facts, after checking its ids against a model's ``vocab_size`` embedding rows.

    Too many ids: an id past the table is silently clamped or turns the loss into NaN. Far too
    few (below ``min_fraction`` of the rows, data.tokenizer_min_vocab_fraction): the wrong or a
    broken tokenizer, e.g. the 3-id one transformers builds from LlamaTokenizerFast(vocab_file=...)
    (FACTS.md), which encodes every text to nothing.
    """
    facts = tokenizer_facts(path)
    if facts.num_ids > vocab_size:
        raise UserError(
            f"the tokenizer '{path}' can emit ids up to {facts.num_ids - 1}, but the model's embedding has "
            f"{vocab_size} rows (vocab_size); use the model's own tokenizer, or extend the model's vocabulary first "
            "(jaxcpt extend-vocab)")
    if facts.num_ids < min_fraction * vocab_size:
        raise UserError(
            f"the tokenizer '{path}' ({facts.kind}) has {facts.num_ids} ids, but the model's embedding has "
            f"{vocab_size} rows: below data.tokenizer_min_vocab_fraction={min_fraction} of them. This is not the "
            "model's tokenizer, or a broken one (LlamaTokenizer(Fast)(vocab_file=...) builds a 3-id vocabulary; "
            "load it with from_pretrained on a directory holding tokenizer.model). Point data.tokenizer at the "
            "model's own tokenizer, set model.vocab_size to fit a model made from scratch, or set "
            "data.tokenizer_min_vocab_fraction=0 if the spare rows are meant")
    return facts


class TokenizeDataset(grain.IterDataset):
    """Documents (str, or token arrays from pre-tokenized shards) -> pieces, ``split_fn(tokens [n] int32)``.

    BOS/EOS come from ``bos_id`` / ``eos_id`` (``None`` = do not add). The tokenizer is
    named by path and loaded lazily in whichever process iterates.
    """

    def __init__(
        self,
        parent: grain.IterDataset,
        *,
        tokenizer_path: str,
        bos_id: int | None,
        eos_id: int | None,
        batch_size: int,
        split_fn: Callable[[np.ndarray], list],
        source: str = "",
        max_without_tokens: int = 0,
        instruction: str = "none",
        loss_on: str = "answer",
        counter=None,
    ):
        super().__init__(parent)
        # Training: the source's BadInputCounter, on which the tokens of one pass over this reader's share are
        # published once its first EpochEnd passes (``pass_tokens``), for the accounting's epochs.
        self.counter = counter
        self.instruction, self.loss_on = instruction, loss_on  # jaxcpt.data.chat: documents with a loss mask
        self.tokenizer_path = tokenizer_path
        self.bos_id, self.eos_id = bos_id, eos_id
        self.batch_size = batch_size
        self.split_fn = split_fn
        self.source = source
        self.max_without_tokens = max_without_tokens  # data.max_documents_without_tokens (0: no check)

    def __iter__(self):
        return _TokenizeIterator(self._parent.__iter__(), self)

    def __str__(self) -> str:
        return f"TokenizeDataset(batch_size={self.batch_size})"

    def encode(self, docs: list) -> list:
        """[n_i] int32 per document, BOS/EOS added; for instruction sources (tokens [n_i], mask [n_i]) pairs."""
        if self.instruction != "none":
            from jaxcpt.data.chat import render

            tok = cached_tokenizer(self.tokenizer_path)
            return [render(tok, d, instruction=self.instruction, loss_on=self.loss_on, bos_id=self.bos_id,
                           eos_id=self.eos_id) for d in docs]
        texts = [(i, d) for i, d in enumerate(docs) if isinstance(d, str)]
        encoded: list = list(docs)
        if texts:
            ids = cached_tokenizer(self.tokenizer_path).encode_batch([t for _, t in texts])
            for (i, _), row in zip(texts, ids):
                encoded[i] = row
        prefix = [self.bos_id] if self.bos_id is not None else []
        suffix = [self.eos_id] if self.eos_id is not None else []
        out = []
        for row in encoded:
            tokens = np.empty(len(prefix) + len(row) + len(suffix), np.int32)  # [n]
            tokens[: len(prefix)] = prefix
            tokens[len(prefix) : len(tokens) - len(suffix)] = row
            tokens[len(tokens) - len(suffix) :] = suffix
            out.append(tokens)
        return out


class _TokenizeIterator(grain.DatasetIterator):
    def __init__(self, parent: grain.DatasetIterator, ds: TokenizeDataset):
        super().__init__(parent)
        self._ds = ds
        self._batch_start_state = self._parent.get_state()
        self._pieces: list = []
        self._next = 0  # pieces of the current batch already yielded
        self._without_tokens = 0  # consecutive documents that encoded to no token id
        # The size of one pass over the source (every pass holds the same documents): next-token pairs of the
        # first pass, summed as it is read; each value also at the batch start, which a saved state holds.
        self._pass = {"ended": 0, "tokens": 0, "size": 0}
        self._batch_start_pass = dict(self._pass)

    def _fill(self) -> None:
        self._batch_start_state = self._parent.get_state()
        self._batch_start_pass = dict(self._pass)
        docs, ends, exhausted = [], [], False
        while len(docs) < self._ds.batch_size:
            try:
                doc = next(self._parent)
            except StopIteration:
                exhausted = True
                break
            if isinstance(doc, EpochEnd):  # the end of a pass: after the documents read so far
                ends.append(len(docs))
            else:
                docs.append(doc)
        encoded = self._ds.encode(docs)
        if self._ds.max_without_tokens:
            self._check_tokens(encoded)
        self._pieces = []
        self._end_passes(ends.count(0))
        for i, doc in enumerate(encoded):
            pieces = self._ds.split_fn(*doc) if isinstance(doc, tuple) else self._ds.split_fn(doc)
            self._pieces += pieces
            if self._pass["ended"] == 0:
                self._pass["tokens"] += sum(len(p["inputs"]) for p in pieces)  # next-token pairs
            self._end_passes(ends.count(i + 1))
        self._next = 0
        if exhausted and not docs:
            raise StopIteration

    def _end_passes(self, count: int) -> None:
        for _ in range(count):
            if self._pass["ended"] == 0:
                self._pass["size"] = self._pass["tokens"]
                if self._ds.counter is not None:
                    self._ds.counter.pass_tokens = self._pass["size"]
            self._pass["ended"] += 1

    def _check_tokens(self, encoded: list[np.ndarray]) -> None:
        """Stop a source whose documents keep encoding to nothing: it would never yield a row (a silent spin)."""
        ds = self._ds
        added = (ds.bos_id is not None) + (ds.eos_id is not None)
        for tokens in encoded:
            tokens = tokens[0] if isinstance(tokens, tuple) else tokens  # (tokens, mask) of instruction documents
            self._without_tokens = self._without_tokens + 1 if len(tokens) <= added else 0
        if self._without_tokens < ds.max_without_tokens:
            return
        if not ds.tokenizer_path:
            raise UserError(
                f"source '{ds.source}': the last {self._without_tokens} documents of its token shards are empty; "
                "rewrite the shards with `jaxcpt tokenize` (data.max_documents_without_tokens sets this limit)"
            )
        facts = cached_tokenizer(ds.tokenizer_path).facts
        raise UserError(
            f"source '{ds.source}': the last {self._without_tokens} documents encode to no token ids with tokenizer "
            f"'{ds.tokenizer_path}' ({facts.kind}, {facts.num_ids} ids), so training would spin on this source "
            "forever. The tokenizer cannot encode this text: a Hugging Face directory saved from "
            "LlamaTokenizer(Fast)(vocab_file=...) has 3 ids and encodes everything to nothing; build it with "
            "from_pretrained(a directory holding tokenizer.model) and save_pretrained, or point data.tokenizer at the "
            "model's own tokenizer. Check also the source's text_field (data.max_documents_without_tokens sets "
            "this limit)"
        )

    def __next__(self):
        while self._next >= len(self._pieces):
            self._fill()  # raises StopIteration at the end of the parent
        piece = self._pieces[self._next]
        self._next += 1
        return piece

    def take_buffered(self) -> tuple[list, dict]:
        """The pieces of the current batch not yet yielded, and the documents' position after that batch
        (jaxcpt.data.staged_rows: a seq_len stage carries them into its new packer)."""
        rest, self._next = self._pieces[self._next :], len(self._pieces)
        return rest, self._parent.get_state()

    def get_state(self) -> dict:
        return {"parent": self._batch_start_state, "next": self._next, "pass": self._batch_start_pass}

    def set_state(self, state: dict) -> None:
        self._parent.set_state(state["parent"])
        self._batch_start_state = state["parent"]
        self._pass = dict(state.get("pass", {"ended": 0, "tokens": 0, "size": 0}))  # older states: counted anew
        self._batch_start_pass = dict(self._pass)
        if self._ds.counter is not None:
            self._ds.counter.pass_tokens = self._pass["size"]
        self._pieces, self._next = [], 0
        if state["next"]:
            self._fill()
            self._next = int(state["next"])
