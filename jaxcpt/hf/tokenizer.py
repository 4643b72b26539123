"""Ship a sentencepiece model as a Hugging Face tokenizer directory (tokenizer.json + config).

Runs trained with a bare ``.model`` file still export a directory that
``AutoTokenizer.from_pretrained`` loads, with the ids sentencepiece gives for ordinary
text. Known differences of the HF fast tokenizers: a text that starts with a space
gets one fewer leading '▁' piece, and characters sentencepiece would spell as bytes
(byte_fallback) become <unk> with a unigram model.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from jaxcpt.errors import UserError


def sentencepiece_to_hf(model_file: str | Path, out_dir: str | Path) -> Path:
    """Write an HF (Llama-style) tokenizer for sentencepiece ``model_file`` into ``out_dir``."""
    import sentencepiece as spm
    from transformers import LlamaTokenizer

    model_file = Path(model_file)
    if not model_file.is_file():
        raise UserError(f"sentencepiece model '{model_file}' does not exist")
    sp = spm.SentencePieceProcessor(model_file=str(model_file))

    def piece(i: int) -> str | None:
        return sp.id_to_piece(i) if 0 <= i < sp.get_piece_size() else None

    specials = dict(bos_token=piece(sp.bos_id()), eos_token=piece(sp.eos_id()), unk_token=piece(sp.unk_id()),
                    pad_token=piece(sp.pad_id()))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if _model_type(model_file) == "bpe":
        with tempfile.TemporaryDirectory() as staging:
            # from_pretrained(dir) with the file named tokenizer.model builds the full vocabulary;
            # LlamaTokenizer(vocab_file=...) silently does not (see shared/FACTS.md).
            shutil.copy2(model_file, Path(staging) / "tokenizer.model")
            tokenizer = LlamaTokenizer.from_pretrained(staging, add_bos_token=True, add_eos_token=False, legacy=False,
                                                       **specials)
    else:  # unigram: transformers' sentencepiece converter keeps the unigram model and its scores
        import warnings

        from transformers import PreTrainedTokenizerFast
        from transformers.convert_slow_tokenizer import SpmConverter

        class _Original:
            vocab_file = str(model_file)

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # byte fallback: rare characters become <unk> in the fast tokenizer
            backend = SpmConverter(_Original()).converted()
        tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, **specials)
    tokenizer.save_pretrained(out)
    shutil.copy2(model_file, out / "tokenizer.model")
    return out


def _model_type(model_file: Path) -> str:
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(model_file.read_bytes())
    return {1: "unigram", 2: "bpe"}.get(proto.trainer_spec.model_type, "unigram")
