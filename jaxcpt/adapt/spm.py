"""New pieces in a sentencepiece BPE ``tokenizer.model``, kept consistent with the extended tokenizer.json.

Sentencepiece's BPE encoder joins *any* adjacent pair whose concatenation is a piece, best
score first. New pieces get scores below every old piece, so encoding first reaches the
old segmentation (the old pieces' merges, in the old order). One more rule keeps it there
for text that forms no new piece: no old piece may be the concatenation of two pieces of
the extended vocabulary of which at least one is new (``SentencePieceRule``). Otherwise a
new piece, once formed, could join a neighbour into an *old* piece, and a text without new
pieces would be encoded differently. With the rule, every join after the old segmentation
produces a new piece: the argument of ``jaxcpt.adapt.bpe`` holds here too.

Ids must match tokenizer.json's. When the model's embedding already has more rows than
the sentencepiece model has pieces (ids reserved for added tokens, padding), the gap is
filled with UNUSED placeholder pieces, which the encoder never produces.
"""

from __future__ import annotations

from pathlib import Path

from jaxcpt.errors import UserError


def _proto(model_file: Path):
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(model_file.read_bytes())
    return proto


class SentencePieceRule:
    """``rule(token, pending)``: whether adding ``token`` keeps every old piece out of reach of new joins."""

    def __init__(self, model_file: Path, vocab: dict[str, int]):
        proto = _proto(model_file)
        if proto.trainer_spec.model_type != 2:  # 1 unigram, 2 bpe
            raise UserError(f"'{model_file}' is not a BPE sentencepiece model; extend-vocab supports BPE tokenizers")
        normal = [p.piece for p in proto.pieces if p.type == 1]
        self._vocab = vocab  # the growing vocabulary (old and new), shared with the BPE model
        self._right_of: dict[str, set[str]] = {}  # left part -> right parts that complete an old piece
        self._left_of: dict[str, set[str]] = {}
        for piece in normal:
            for i in range(1, len(piece)):
                self._right_of.setdefault(piece[:i], set()).add(piece[i:])
                self._left_of.setdefault(piece[i:], set()).add(piece[:i])

    def __call__(self, token: str, pending: frozenset[str] = frozenset()) -> bool:
        """``pending``: the other tokens about to be added together with ``token``."""
        def present(part: str) -> bool:
            return part in self._vocab or part in pending or part == token

        return not any(map(present, self._right_of.get(token, ()))) and not any(map(present, self._left_of.get(token, ())))


def extend_model_file(model_file: Path, new_tokens: list[tuple[int, str]]) -> bytes:
    """The serialized model with ``new_tokens`` ((id, piece), ids ascending) appended at those ids."""
    proto = _proto(model_file)
    piece_type = type(proto.pieces[0]) if proto.pieces else None
    normal_scores = [p.score for p in proto.pieces if p.type == 1]
    score = (min(normal_scores) if normal_scores else 0.0) - 1.0
    existing = {p.piece for p in proto.pieces}
    for token_id, token in new_tokens:
        if token_id < len(proto.pieces):
            raise UserError(f"'{model_file}' already has a piece with id {token_id}; the tokenizer files disagree")
        while len(proto.pieces) < token_id:
            placeholder = proto.pieces.add()
            placeholder.piece, placeholder.score = f"<jaxcpt_unused_{len(proto.pieces) - 1}>", 0.0
            placeholder.type = piece_type.Type.UNUSED
        if token in existing:
            raise UserError(f"'{model_file}' already has the piece {token!r}; the tokenizer files disagree")
        piece = proto.pieces.add()
        piece.piece, piece.score, piece.type = token, score, piece_type.Type.NORMAL
        score -= 1.0
    proto.trainer_spec.vocab_size = len(proto.pieces)
    return proto.SerializeToString()
