"""Train a tokenizer on documents: sentencepiece BPE, or Hugging Face ``tokenizers`` byte-level BPE.

The new tokenizer is meant to be merged into a base with ``jaxcpt extend-vocab``, so it
is trained the way the base was wherever the base tells: a sentencepiece base lends its
trainer and normalizer settings (byte fallback, digit splitting, dummy prefix, special
ids), a byte-level base its normalizer, pre-tokenizer (the regex that cuts text into
words: a token across its cuts could never be produced by the base) and decoder. Both
write an HF tokenizer directory (sentencepiece adds ``tokenizer.model``), which
``data.tokenizer`` and ``extend-vocab --tokens`` accept.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path

from jaxcpt.errors import UserError

KINDS = ("sentencepiece", "bpe")


def kind_of(base_dir: str | Path) -> str:
    """'sentencepiece' or 'bpe' (byte-level), from a base tokenizer directory."""
    from jaxcpt.adapt.bpe import Alphabet

    base = Path(base_dir)
    if (base / "tokenizer.json").is_file():
        return "bpe" if Alphabet.of(json.loads((base / "tokenizer.json").read_text())).byte_level else "sentencepiece"
    if (base / "tokenizer.model").is_file():
        return "sentencepiece"
    raise UserError(f"'{base}' holds neither tokenizer.json nor tokenizer.model; pass --kind instead of --base")


def _lines(texts: Iterable[str]) -> Iterator[str]:
    """Sentencepiece trains on sentences: each non-empty line of each document."""
    for text in texts:
        for line in text.split("\n"):
            if line.strip():
                yield line


def _sentencepiece_settings(base_model: Path | None) -> dict:
    """Trainer arguments: the base's where it has a model file, else those of jaxcpt's own demo tokenizer."""
    settings = dict(model_type="bpe", normalization_rule_name="identity", remove_extra_whitespaces=False,
                    add_dummy_prefix=True, byte_fallback=True, character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2,
                    pad_id=-1)
    if base_model is None:
        return settings
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(base_model.read_bytes())
    spec, norm = proto.trainer_spec, proto.normalizer_spec
    settings.update(model_type={1: "unigram", 2: "bpe"}.get(spec.model_type, "bpe"),
                    normalization_rule_name=norm.name or "identity", add_dummy_prefix=norm.add_dummy_prefix,
                    remove_extra_whitespaces=norm.remove_extra_whitespaces)
    for name in ("byte_fallback", "split_digits", "split_by_whitespace", "split_by_unicode_script", "split_by_number",
                 "treat_whitespace_as_suffix", "allow_whitespace_only_pieces", "max_sentencepiece_length",
                 "character_coverage", "unk_id", "bos_id", "eos_id", "pad_id", "unk_piece", "bos_piece", "eos_piece",
                 "pad_piece"):
        if spec.HasField(name):
            settings[name] = getattr(spec, name)
    if norm.name not in ("", "identity", "nfkc", "nmt_nfkc", "nfkc_cf", "nmt_nfkc_cf"):
        settings["normalization_rule_name"] = "identity"  # a custom rule set cannot be named; it ships its charsmap
    return settings


def train_sentencepiece(texts: Iterable[str], out_dir: str | Path, vocab_size: int, *, base_model: Path | None = None,
                        num_threads: int = 2) -> Path:
    """A sentencepiece model trained on ``texts``, written as an HF tokenizer directory ``out_dir``."""
    import tempfile

    import sentencepiece as spm

    from jaxcpt.hf.tokenizer import sentencepiece_to_hf

    settings = _sentencepiece_settings(base_model)
    with tempfile.TemporaryDirectory(prefix="jaxcpt_spm_") as tmp:
        prefix = str(Path(tmp) / "tokenizer")
        try:
            spm.SentencePieceTrainer.train(sentence_iterator=_lines(texts), model_prefix=prefix, vocab_size=vocab_size,
                                           max_sentence_length=1 << 16, num_threads=num_threads, minloglevel=2,
                                           **settings)
        except RuntimeError as e:
            raise UserError(f"sentencepiece could not train a {vocab_size}-token model: {e}") from None
        return sentencepiece_to_hf(prefix + ".model", out_dir)


def train_bpe(texts: Iterable[str], out_dir: str | Path, vocab_size: int, *, base_dir: Path | None = None,
              min_frequency: int = 2) -> Path:
    """A byte-level BPE tokenizer trained on ``texts`` (``tokenizers``), written as an HF tokenizer directory."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    specials = ["<|endoftext|>"]
    if base_dir is not None:
        base = Tokenizer.from_file(str(Path(base_dir) / "tokenizer.json"))
        tokenizer.normalizer, tokenizer.pre_tokenizer, tokenizer.decoder = base.normalizer, base.pre_tokenizer, base.decoder
        specials = [t.content for t in base.get_added_tokens_decoder().values() if t.special] or specials
    else:
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(texts, trainer)
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=specials[0])
    wrapped.save_pretrained(str(out_dir))
    return Path(out_dir)
