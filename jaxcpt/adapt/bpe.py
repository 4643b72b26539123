"""The BPE model inside a Hugging Face ``tokenizer.json``, and how to add tokens to it that encoding produces.

Both kinds of base the stack meets are BPE models with explicit, ranked merges:
byte-level BPE (GPT-2, Llama 3, Qwen: tokens are strings over 256 characters standing
for bytes) and sentencepiece BPE converted by transformers (Llama 2, Mistral: '▁' stands
for a space, rare characters fall back to ``<0xNN>`` byte tokens).

Why old ids and old segmentations cannot change. A new token gets an id after every
existing one (no id is reused or moved), and every merge that produces it is appended
*after* all existing merges, with a result that is never an existing token. The BPE
encoder of a word repeatedly applies the adjacent pair of lowest rank. While any old
merge applies it outranks every new one, so encoding first runs exactly the old merges,
in the old order, to the old segmentation. New merges then only join adjacent pieces into
new tokens, and no old merge can apply afterwards (its operands are old tokens, and new
merges only remove old tokens). So the new encoding of any text is the old encoding with
some runs of adjacent tokens joined into new tokens: a text whose new encoding holds no
new id is encoded exactly as before, and every old id in a new encoding stands where it
stood (tests/test_adapt_vocab.py checks this on every text it encodes). Pre-tokenization,
normalization and special tokens are not touched.

Making new tokens reachable. A token is produced only if, within a word, the pieces
encoding has formed when its merges' turn comes are the token's two halves. For each new
token the pieces the current (already extended) tokenizer splits it into are joined by a
chain of merges, left to right (or right to left when that would have to produce an
existing token), adding the intermediate strings as new tokens too. Besides that chain,
every split of a new token into two tokens of the final vocabulary is added as a merge at
the token's rank (as transformers does for sentencepiece models), so the token also forms
when encoding reaches it by another split, and the merges mirror sentencepiece's rule
"join any adjacent pair whose concatenation is a piece".

Choosing the chains needs the segmentation of each candidate under the growing merge
table; rebuilding a ``tokenizers.Tokenizer`` per candidate would take minutes for a real
vocabulary, so ``BPEModel.segment`` applies the merges to one word in Python, with the
library's tie rule (lowest rank, then leftmost). The finished tokenizer is then checked
with the library itself (``unreachable`` in the plan's report).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import re
from collections.abc import Callable, Iterable

from jaxcpt.errors import UserError

BYTE_TOKEN = re.compile(r"^<0x[0-9A-Fa-f]{2}>$")


def _components(node: dict | None) -> list[dict]:
    """A normalizer / pre-tokenizer / decoder and, for a Sequence, the components inside it."""
    if not node:
        return []
    inner = node.get("pretokenizers") or node.get("normalizers") or node.get("decoders") or []
    return [node] + [c for child in inner for c in _components(child)]


@dataclasses.dataclass(frozen=True)
class Alphabet:
    """How a tokenizer spells text in its tokens: ``byte_level`` (one character per byte) or a
    space ``replacement`` ('▁', sentencepiece style) with ``<0xNN>`` byte-fallback tokens."""

    byte_level: bool
    replacement: str = "\u2581"

    @staticmethod
    def of(tokenizer_json: dict) -> "Alphabet":
        parts = [c for key in ("pre_tokenizer", "decoder", "normalizer") for c in _components(tokenizer_json.get(key))]
        if any(c.get("type") == "ByteLevel" for c in parts):
            return Alphabet(byte_level=True)
        for c in parts:
            if c.get("type") == "Metaspace":
                return Alphabet(byte_level=False, replacement=c.get("replacement", "\u2581"))
            if c.get("type") == "Replace" and (c.get("pattern") or {}).get("String") == " " and c.get("content"):
                return Alphabet(byte_level=False, replacement=c["content"])
        raise UserError("the tokenizer is neither byte-level BPE nor sentencepiece-style (Metaspace); "
                        "extend-vocab supports those two kinds")

    def to_token(self, surface: bytes) -> str | None:
        """The token string spelling ``surface`` (UTF-8 bytes), or None if this alphabet cannot spell it."""
        if self.byte_level:
            table = _byte_chars()
            return "".join(table[b] for b in surface)
        try:
            return surface.decode("utf-8").replace(" ", self.replacement)
        except UnicodeDecodeError:
            return None  # part of a character: sentencepiece-style tokens hold whole characters

    def to_surface(self, token: str) -> bytes | None:
        """The UTF-8 bytes a token stands for, or None for a token outside the alphabet."""
        if self.byte_level:
            table = _char_bytes()
            if any(c not in table for c in token):
                return None
            return bytes(table[c] for c in token)
        if BYTE_TOKEN.match(token):
            return bytes([int(token[3:5], 16)])
        return token.replace(self.replacement, " ").encode("utf-8")


@functools.cache
def _byte_chars() -> dict[int, str]:
    from transformers.convert_slow_tokenizer import bytes_to_unicode  # the GPT-2 byte -> character table

    return bytes_to_unicode()


@functools.cache
def _char_bytes() -> dict[str, int]:
    return {c: b for b, c in _byte_chars().items()}


def _pair(merge) -> tuple[str, str]:
    if isinstance(merge, str):  # tokenizers < 0.20 wrote merges as "a b"
        left, right = merge.split(" ", 1)
        return left, right
    return merge[0], merge[1]


class BPEModel:
    """Vocabulary and ranked merges of a tokenizer.json BPE model, growable with new tokens."""

    def __init__(self, tokenizer_json: dict, where: str):
        model = tokenizer_json.get("model", {})
        if model.get("type") != "BPE":
            raise UserError(f"{where}: the tokenizer model is {model.get('type')!r}; extend-vocab supports BPE "
                            "tokenizers (byte-level like Llama 3 / Qwen, or sentencepiece BPE like Llama 2 / Mistral)")
        for option in ("continuing_subword_prefix", "end_of_word_suffix"):
            if model.get(option):
                raise UserError(f"{where}: BPE models with {option} are not supported")
        self.json = tokenizer_json
        self.alphabet = Alphabet.of(tokenizer_json)
        self.vocab: dict[str, int] = dict(model["vocab"])
        self.old = frozenset(self.vocab)
        # rank: old merges (0, i); new ones (1, token index, split position): every new merge after every old one
        self.ranks: dict[tuple[str, str], tuple] = {}
        for i, merge in enumerate(model.get("merges", [])):
            self.ranks.setdefault(_pair(merge), (0, i))
        self.added_ids = {t["id"] for t in tokenizer_json.get("added_tokens", [])}
        self.placeholders: set[str] = set()
        self.new_tokens: list[str] = []
        self._new_index: dict[str, int] = {}
        self._by_prefix: dict[str, list[str]] = {}  # proper prefix -> new tokens starting with it
        self._by_suffix: dict[str, list[str]] = {}

    @property
    def size(self) -> int:
        """One past the largest id the tokenizer uses (vocabulary and added tokens)."""
        return max([*self.vocab.values(), *self.added_ids], default=-1) + 1

    def reserve(self, first_id: int) -> None:
        """Give every id below ``first_id`` a vocabulary entry, before new tokens are added from ``first_id``.

        ``tokenizers`` re-numbers, when loading, each added token missing from the model's
        vocabulary to the vocabulary's *entry count* (and numbers tokens added later the same
        way): with new ids after a gap (a Qwen-style embedding with more rows than token ids)
        that would move the special tokens and collide with the new ids. So added tokens are
        entered at their own ids, and the unused ids in between get placeholders no text can
        encode to (``<jaxcpt_unused_N>``: no merge produces them, no pre-tokenizer keeps them in
        one piece), which makes the ids contiguous and ``len(tokenizer)`` the model's size."""
        added = {t["id"]: t["content"] for t in self.json.get("added_tokens", [])}
        used = set(self.vocab.values())
        for token_id in range(first_id):
            if token_id not in used:
                token = added.get(token_id) or f"<jaxcpt_unused_{token_id}>"
                self.vocab[token] = token_id
                if token_id not in added:
                    self.placeholders.add(token)
        self.old = frozenset(self.vocab)

    def ordinary_tokens(self) -> dict[str, int]:
        """Old tokens that spell text: not added/special tokens, byte-fallback tokens or placeholders."""
        return {t: i for t, i in self.vocab.items() if t in self.old and i not in self.added_ids
                and t not in self.placeholders and not BYTE_TOKEN.match(t)}

    def segment(self, word: str) -> list[str]:
        """``word``'s pieces under the current merges (characters missing from the vocabulary stay single)."""
        symbols = list(word)
        while len(symbols) > 1:
            best = None
            for i in range(len(symbols) - 1):
                rank = self.ranks.get((symbols[i], symbols[i + 1]))
                if rank is not None and (best is None or rank < best[0]):
                    best = (rank, i)
            if best is None:
                break
            i = best[1]
            symbols[i : i + 2] = [symbols[i] + symbols[i + 1]]
        return symbols

    def add(self, token: str, token_id: int) -> None:
        """Add ``token`` with every merge of two current tokens into it, and every merge it now completes."""
        index = len(self.new_tokens)
        self.vocab[token] = token_id
        self.new_tokens.append(token)
        self._new_index[token] = index
        for i in range(1, len(token)):
            left, right = token[:i], token[i:]
            if left in self.vocab and right in self.vocab:
                self.ranks.setdefault((left, right), (1, index, i))
            self._by_prefix.setdefault(left, []).append(token)
            self._by_suffix.setdefault(right, []).append(token)
        # earlier new tokens that split into this one and a current token
        for longer in self._by_prefix.get(token, []):
            rest = longer[len(token):]
            if rest in self.vocab:
                self.ranks.setdefault((token, rest), (1, self._new_index[longer], len(token)))
        for longer in self._by_suffix.get(token, []):
            rest = longer[: -len(token)]
            if rest in self.vocab:
                self.ranks.setdefault((rest, token), (1, self._new_index[longer], len(rest)))

    def chain(self, token: str, allowed: Callable[[str, frozenset[str]], bool]) -> list[str] | None:
        """The new tokens (intermediates, then ``token``) whose merges make ``token`` reachable, or None.

        Characters missing from the vocabulary become tokens themselves. No step may produce an
        existing old token (that would change old segmentations), nor a token that
        ``allowed(token, other tokens of the plan)`` rejects.
        """
        pieces = self.segment(token)
        singles = [p for p in dict.fromkeys(pieces) if p not in self.vocab]
        for order in (pieces, pieces[::-1]):
            steps, acc = [], order[0]
            for piece in order[1:]:
                acc = acc + piece if order is pieces else piece + acc
                if acc in self.old:
                    break
                if acc not in self.vocab:
                    steps.append(acc)
            else:
                plan = singles + list(dict.fromkeys(steps))
                pending = frozenset(plan)
                if all(allowed(t, pending) for t in plan):
                    return plan
        return None

    def to_json(self) -> dict:
        """The tokenizer.json dict with the grown vocabulary and merge table."""
        out = json.loads(json.dumps(self.json))
        out["model"]["vocab"] = self.vocab
        out["model"]["merges"] = [list(pair) for pair, _ in sorted(self.ranks.items(), key=lambda kv: kv[1])]
        return out

    def overlaps(self, token: str, ordinary: dict[str, int]) -> list[tuple[int, float]]:
        """(old id, fraction of ``token`` it covers) for every ordinary old token occurring in ``token``'s string."""
        found: dict[int, float] = {}
        for i in range(len(token)):
            for j in range(i + 1, len(token) + 1):
                old_id = ordinary.get(token[i:j])
                if old_id is not None:
                    found[old_id] = (j - i) / len(token)
        return sorted(found.items())


def one_pretoken(tokenizer, surface: bytes) -> bool:
    """Whether the base's pre-tokenizer keeps ``surface`` in one piece (else the token could never form).

    Byte strings that are not UTF-8 (part of a character) cannot be pre-tokenized as text; they
    are accepted, as pre-tokenizers do not split inside a character."""
    pre = tokenizer.pre_tokenizer
    if pre is None:
        return True
    try:
        text = surface.decode("utf-8")
    except UnicodeDecodeError:
        return True
    return len(pre.pre_tokenize_str(text)) == 1


def unreachable(tokenizer_json: dict, tokens: Iterable[str]) -> list[str]:
    """The tokens the finished tokenizer's BPE model does not produce from their own string."""
    from tokenizers import Tokenizer

    model = Tokenizer.from_str(json.dumps(tokenizer_json)).model
    return [t for t in tokens if [p.value for p in model.tokenize(t)] != [t]]
