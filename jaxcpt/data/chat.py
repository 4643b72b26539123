"""Instruction and chat documents -> token ids and a per-token loss mask.

A record of an instruction source arrives as canonical JSON (``jaxcpt.data.sources``):
``{"messages": [{role, content}, ...]}`` or ``{"prompt": ..., "completion": ...}``.

- messages: rendered with the tokenizer's own chat template. Each message's tokens are the
  difference between the template rendered up to and including it and rendered up to it (with
  the generation prompt before an assistant turn, so the "<|assistant|>" header is context):
  the text of a turn is what the template adds for it, whatever the template looks like. The
  pieces are tokenized one by one, so a token never straddles a turn boundary.
- prompt/completion: BOS + prompt + completion + EOS (BOS/EOS as the source's convention).

The mask is over tokens, 1 where the token is an answer token (assistant turns, the completion,
the EOS closing it) when ``loss_on`` is "answer", 1 everywhere when "all". Packing turns it into
``loss_mask`` over *targets* (``mask[1:]``): a position trains when the token it predicts is one.
"""

from __future__ import annotations

import json

import numpy as np

from jaxcpt.config import ConfigError


def require_chat_template(tokenizer, tokenizer_path: str, source: str) -> None:
    template = getattr(getattr(tokenizer, "_tok", None), "chat_template", None)
    if not template:
        raise ConfigError(
            f"source '{source}' holds chat messages (instruction: messages), but the tokenizer '{tokenizer_path}' has "
            "no chat template; use the model's Hugging Face tokenizer directory with its chat_template "
            "(tokenizer_config.json or chat_template.jinja), or write the data as prompt/completion pairs "
            "(instruction: prompt_completion)")


def _message_texts(tok, messages: list[dict]) -> list[tuple[str, bool]]:
    """[(text the template adds, is an answer)] for each turn, whose concatenation is the whole rendering."""
    pieces, before = [], ""
    for i, message in enumerate(messages):
        answer = message["role"] == "assistant"
        if answer:  # the assistant header belongs to the context
            header = tok.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True) if i else ""
            if header.startswith(before) and len(header) > len(before):
                pieces.append((header[len(before):], False))
                before = header
        upto = tok.apply_chat_template(messages[: i + 1], tokenize=False)
        if not upto.startswith(before):
            raise ConfigError("the tokenizer's chat template does not render a conversation as a prefix of its "
                              "continuation; jaxcpt cannot mark the answer tokens of this template")
        pieces.append((upto[len(before):], answer))
        before = upto
    return pieces


def render(tokenizer, document: str, *, instruction: str, loss_on: str, bos_id: int | None,
           eos_id: int | None) -> tuple[np.ndarray, np.ndarray]:
    """(tokens [n] int32, mask [n] float32) of one instruction document (see the module docstring)."""
    record = json.loads(document)
    if instruction == "messages":
        tok = tokenizer._tok
        pieces = _message_texts(tok, record["messages"])
        # The template writes its own BOS (as text): add none; EOS closes the document, part of the last answer.
        bos_text = tok.bos_token or ""
        prefix = [] if (bos_text and pieces and pieces[0][0].startswith(bos_text)) or bos_id is None else [bos_id]
    else:
        pieces = [(record["prompt"], False), (record["completion"], True)]
        prefix = [] if bos_id is None else [bos_id]
    ids, mask = list(prefix), [0.0] * len(prefix)
    for (text, answer), encoded in zip(pieces, tokenizer.encode_batch([t for t, _ in pieces])):
        ids += encoded
        mask += [1.0 if answer else 0.0] * len(encoded)
    if eos_id is not None:
        ids.append(eos_id)
        mask.append(1.0)
    out_mask = np.asarray(mask, np.float32)  # [n]
    if loss_on == "all":
        out_mask[:] = 1.0
    return np.asarray(ids, np.int32), out_mask
