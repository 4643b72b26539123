"""New pieces in a sentencepiece BPE ``tokenizer.model``, kept consistent with the extended tokenizer.json.

Sentencepiece's BPE encoder joins *any* adjacent pair whose concatenation is a piece, best
score first. New pieces get scores below every old piece, so encoding first reaches the
old segmentation (the old pieces' joins, in the old order). What could still go wrong: a
new piece, once formed, joins a neighbour into an *old* piece P, and a text without new
pieces is encoded differently. ``SentencePieceRule`` refuses every new piece that could
take part in such a join, i.e. one that makes P = A + B, with A, B both in the extended
vocabulary and at least one of them new, and whose split A | B the old segmentation of P
(encoded on its own) respects. Why encoding P on its own is the test: the join needs the
pieces covering P's span at the end of the old merges to lie inside the span (A and B are
built from them), so no old join crossed the span's edges; the joins inside the span then
ran in the same order as for P alone (sentencepiece picks the best-scoring pair, position
breaking ties), and ended where P alone ends. If P alone encodes as [P], or as pieces
across A | B, the join cannot happen. With the rule, every join after the old
segmentation produces a new piece: the argument of ``jaxcpt.adapt.bpe`` holds here too.

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
        import sentencepiece as spm

        proto = _proto(model_file)
        if proto.trainer_spec.model_type != 2:  # 1 unigram, 2 bpe
            raise UserError(f"'{model_file}' is not a BPE sentencepiece model; extend-vocab supports BPE tokenizers")
        self._vocab = vocab  # the growing vocabulary (old and new), shared with the BPE model
        self._splits: dict[str, list[tuple[str, str]]] = {}  # part -> (left, right) splits of old pieces using it
        for piece in (p.piece for p in proto.pieces if p.type == 1):
            for i in range(1, len(piece)):
                split = (piece[:i], piece[i:])
                self._splits.setdefault(split[0], []).append(split)
                self._splits.setdefault(split[1], []).append(split)
        # The old model on raw piece strings: no dummy prefix, no normalization.
        proto.normalizer_spec.add_dummy_prefix = False
        proto.normalizer_spec.remove_extra_whitespaces = False
        proto.normalizer_spec.name, proto.normalizer_spec.precompiled_charsmap = "identity", b""
        self._alone = spm.SentencePieceProcessor(model_proto=proto.SerializeToString())
        self._cuts: dict[str, frozenset[int]] = {}

    def _old_cuts(self, piece: str) -> frozenset[int]:
        """Character positions inside ``piece`` where its old segmentation, encoded alone, cuts it."""
        if piece not in self._cuts:
            ends, position = set(), 0
            for part in self._alone.encode(piece, out_type=str):
                position += len(part)
                ends.add(position)
            self._cuts[piece] = frozenset(ends - {len(piece)})
        return self._cuts[piece]

    def __call__(self, token: str, pending: frozenset[str] = frozenset()) -> bool:
        """``pending``: the other tokens about to be added together with ``token``."""
        def present(part: str) -> bool:
            return part in self._vocab or part in pending or part == token

        for left, right in self._splits.get(token, ()):
            if present(left) and present(right) and len(left) in self._old_cuts(left + right):
                return False
        return True


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
