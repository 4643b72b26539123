"""Real-shaped Hugging Face tokenizer directories, built in-process (nothing downloaded).

- ``llama_style_tokenizer_dir()``: a sentencepiece BPE saved the way Llama 2 / Mistral
  repositories ship it: ``tokenizer.model`` beside the ``tokenizer.json`` transformers'
  LlamaTokenizer writes, ``<s>`` (1) prepended by the post-processor, ``</s>`` (2) not
  appended, ``add_bos_token: true`` / ``add_eos_token: false`` in tokenizer_config.json.
- ``qwen_style_tokenizer_dir()``: a byte-level BPE (ByteLevel pre-tokenizer, trained with the
  ``tokenizers`` library) laid out like Qwen2/2.5: no BOS token at all, ``<|endoftext|>`` as
  EOS and PAD, and the special tokens (``<|endoftext|>``, ``<|im_start|>``, ``<|im_end|>``)
  numbered after the BPE vocabulary, so the tokenizer emits more ids than its base vocabulary.

Both are built once per test process into a temporary directory and returned by path. The
constants below say what a test may rely on.
"""

from __future__ import annotations

import atexit
import functools
import json
import os
import shutil
import tempfile

from test_data_fixtures import make_texts, sp_model

LLAMA_STYLE = {"bos_id": 1, "eos_id": 2, "pad_id": None, "adds_bos": True, "adds_eos": False, "num_ids": 320}

QWEN_BPE_VOCAB = 400  # ids 0..399 are byte-level BPE tokens
QWEN_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")  # then 400, 401, 402
QWEN_STYLE = {"bos_id": None, "eos_id": 400, "pad_id": 400, "adds_bos": False, "adds_eos": False, "num_ids": 403}


def _temp_dir(prefix: str) -> str:
    directory = tempfile.mkdtemp(prefix=prefix)
    atexit.register(shutil.rmtree, directory, ignore_errors=True)
    return directory


def _update_tokenizer_config(directory: str, **entries) -> None:
    path = os.path.join(directory, "tokenizer_config.json")
    with open(path) as f:
        config = json.load(f)
    config.update(entries)
    with open(path, "w") as f:
        json.dump(config, f, indent=2)


@functools.lru_cache(maxsize=None)
def llama_style_tokenizer_dir() -> str:
    """An HF directory of the tiny sentencepiece model (``sp_model()``, vocabulary 320), Llama-style."""
    from transformers import LlamaTokenizer

    root = _temp_dir("jaxcpt_llama_tok_")
    staging, out = os.path.join(root, "staging"), os.path.join(root, "tokenizer")
    os.makedirs(staging)
    # from_pretrained(dir) with the file named tokenizer.model: LlamaTokenizer(vocab_file=...)
    # silently builds a 3-token vocabulary (FACTS.md).
    shutil.copy(sp_model(), os.path.join(staging, "tokenizer.model"))
    tokenizer = LlamaTokenizer.from_pretrained(staging, add_bos_token=True, add_eos_token=False, legacy=False)
    tokenizer.save_pretrained(out)
    # What a Llama 2 repository holds besides: the sentencepiece file and the flags in the config.
    shutil.copy(sp_model(), os.path.join(out, "tokenizer.model"))
    _update_tokenizer_config(out, add_bos_token=True, add_eos_token=False, legacy=False)
    return out


@functools.lru_cache(maxsize=None)
def qwen_style_tokenizer_dir() -> str:
    """An HF directory of a byte-level BPE without BOS, Qwen2-style (ids: see the module docstring)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=QWEN_BPE_VOCAB, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    backend.train_from_iterator(make_texts(1000, seed=321), trainer)
    assert backend.get_vocab_size() == QWEN_BPE_VOCAB
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in QWEN_SPECIALS])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token=None, eos_token=QWEN_SPECIALS[0], pad_token=QWEN_SPECIALS[0]
    )
    out = os.path.join(_temp_dir("jaxcpt_qwen_tok_"), "tokenizer")
    tokenizer.save_pretrained(out)
    _update_tokenizer_config(out, tokenizer_class="Qwen2Tokenizer", add_bos_token=False, bos_token=None)
    return out
