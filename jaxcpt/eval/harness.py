"""The jaxcpt model inside EleutherAI's evaluation harness (lm-eval): ``JaxcptLM``.

A ``lm_eval.api.model.TemplateLM`` whose requests are built exactly as the harness's own
Hugging Face backend builds them (the same ``_encode_pair``, prefix token, rolling windows,
stop sequences and post-processing), computed by the sharded JAX model:

- ``loglikelihood`` / ``loglikelihood_rolling``: batches of ``batch_size`` rows padded to a
  few lengths (powers of two), so each shape compiles once; the log-probability of each
  target token and whether it is the greedy choice are computed on the device, the
  [batch, length, vocab] log-softmax never reaches the host.
- ``generate_until``: greedy decoding with a KV cache (``jaxcpt.model.decode``), left-padded
  prompts, stop at EOS on the device and at the task's stop strings on the host.

Several hosts: the model's arrays span all of them, so every host runs every request, in
the same order (inputs replicated); the results are the same on every host and only
process 0 writes them.

    lm = JaxcptLM.from_path("runs/cpt")           # a run, a checkpoint step or an HF directory
    results = lm_eval.simple_evaluate(model=lm, tasks=["my_task"], task_manager=...)
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.models.utils import handle_stop_sequences, has_bos_prefix, normalize_gen_kwargs, postprocess_generated_text
from tqdm import tqdm

from jaxcpt.model.decode import generate_greedy
from jaxcpt.model.layers import output_logits

MIN_BUCKET = 16


def bucket(length: int, cap: int) -> int:
    """The padded length for ``length`` tokens: the next power of two (at least 16), at most ``cap``."""
    return min(cap, max(MIN_BUCKET, 1 << max(0, math.ceil(math.log2(max(length, 1))))))


def _token_scores(graphdef, params, tokens, targets, valid):
    """(log p(target) [B, T], target is the argmax [B, T]) for right-padded rows (``valid`` [B, T])."""
    model = nnx.merge(graphdef, params)
    cfg = model.config
    segment_ids = valid.astype(jnp.int32)
    hidden = model.hidden_states(tokens, segment_ids)  # [B, T, E]
    out_w = model.output_weights().astype(cfg.dtype)

    def one_position_block(h, t):  # h [B, C, E], t [B, C]
        logits = output_logits(h, out_w, vocab_size=cfg.vocab_size, cap=cfg.final_logit_softcap)  # [B, C, Vp]
        logp = jax.nn.log_softmax(logits, axis=-1)
        target_logp = jnp.take_along_axis(logp, t[..., None], axis=-1)[..., 0]
        return target_logp, jnp.argmax(logits, axis=-1) == t

    chunk = 128 if tokens.shape[1] % 128 == 0 else tokens.shape[1]  # bounds logits memory to [B, 128, V]
    b, t = tokens.shape
    h = hidden.reshape(b, t // chunk, chunk, -1).swapaxes(0, 1)  # [n, B, C, E]
    tg = targets.reshape(b, t // chunk, chunk).swapaxes(0, 1)
    logp, greedy = jax.lax.map(lambda xs: one_position_block(*xs), (h, tg))
    return logp.swapaxes(0, 1).reshape(b, t), greedy.swapaxes(0, 1).reshape(b, t)


class JaxcptLM(TemplateLM):
    """lm-eval's model interface over a jaxcpt model (``graphdef`` + ``params``) and its HF tokenizer."""

    def __init__(self, graphdef, params, config, tokenizer, *, mesh, batch_size: int = 8, max_length: int | None = None,
                 max_gen_toks: int = 256):
        super().__init__()
        self._graphdef = graphdef
        self.params = params  # the weights scored; a training run swaps in its current (or averaged) ones
        self.config = config
        self.tokenizer = tokenizer
        self.mesh = mesh
        self.batch_size = int(batch_size)
        self._max_length = int(max_length or self.config.max_position_embeddings)
        self._max_gen_toks = int(max_gen_toks)
        self._replicated = NamedSharding(mesh, PartitionSpec())
        self._score = jax.jit(_token_scores, out_shardings=self._replicated)

    # -- construction ---------------------------------------------------------------
    @classmethod
    def from_path(cls, path, *, mesh=None, dtype: str = "float32", weights: str = "raw", **kwargs) -> JaxcptLM:
        """A jaxcpt run directory, its checkpoints directory or one step, or an HF directory."""
        from jaxcpt.eval.loading import load_for_evaluation

        model, tokenizer, mesh = load_for_evaluation(path, mesh=mesh, dtype=dtype, weights=weights)
        graphdef, state = nnx.split(model)
        return cls(graphdef, state, model.config, tokenizer, mesh=mesh, **kwargs)

    # -- what the harness reads -----------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:  # as lm-eval's HF backend: BOS, else EOS, before an empty context
        return self.tokenizer.bos_token_id if self.tokenizer.bos_token_id is not None else self.tokenizer.eos_token_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, left_truncate_len=None, **kwargs):
        """As lm-eval's HF backend: the tokenizer's own special tokens, unless the string starts with BOS."""
        options = {} if add_special_tokens is None else {"add_special_tokens": add_special_tokens}
        if add_special_tokens is None and has_bos_prefix(string, self.tokenizer.decode(self.prefix_token_id)):
            options["add_special_tokens"] = False
        encoding = self.tokenizer.encode(string, **options)
        return encoding[-left_truncate_len:] if left_truncate_len else encoding

    def tok_decode(self, tokens, skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=skip_special_tokens)

    def _to_device(self, array: np.ndarray) -> jax.Array:
        return jax.make_array_from_process_local_data(self._replicated, array)

    # -- scoring ----------------------------------------------------------------------
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """requests: ((context, continuation) | None, context_enc, continuation_enc) -> (logprob, is_greedy)."""
        rows = []
        for _, context_enc, continuation_enc in requests:
            whole = (context_enc + continuation_enc)[-(self.max_length + 1):]
            rows.append((whole[:-1], whole[1:], len(continuation_enc)))
        order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))  # long first: one shape per batch
        results: list = [None] * len(rows)
        progress = tqdm(total=len(rows), disable=disable_tqdm or jax.process_index() != 0,
                        desc="Running loglikelihood requests")
        for start in range(0, len(order), self.batch_size):
            batch = order[start:start + self.batch_size]
            length = bucket(len(rows[batch[0]][0]), self.max_length)
            inputs = np.zeros((self.batch_size, length), np.int32)
            targets = np.zeros((self.batch_size, length), np.int32)
            valid = np.zeros((self.batch_size, length), bool)
            for row, index in enumerate(batch):
                inp, tgt, _ = rows[index]
                inputs[row, :len(inp)], targets[row, :len(tgt)], valid[row, :len(inp)] = inp, tgt, True
            logp, greedy = self._score(self._graphdef, self.params, self._to_device(inputs),
                                       self._to_device(targets), self._to_device(valid))
            logp, greedy = np.asarray(logp), np.asarray(greedy)
            for row, index in enumerate(batch):
                inp, _, continuation_length = rows[index]
                span = slice(len(inp) - continuation_length, len(inp))
                answer = (float(logp[row, span].sum()), bool(greedy[row, span].all()))
                results[index] = answer
                request = requests[index]
                if request[0] is not None:
                    self.cache_hook.add_partial("loglikelihood", request[0], answer)
            progress.update(len(batch))
        progress.close()
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Whole-document log-likelihood over disjoint windows of the context length, as the HF backend."""
        out = []
        for (string,) in tqdm([r.args for r in requests], disable=disable_tqdm or jax.process_index() != 0):
            windows = map(lm_utils.make_disjoint_window, lm_utils.get_rolling_token_windows(
                token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length, context_len=1))
            scores = self._loglikelihood_tokens([(None, *w) for w in windows], disable_tqdm=True)
            total = sum(s[0] for s in scores)
            out.append(total)
            self.cache_hook.add_partial("loglikelihood_rolling", (string,), total)
        return out

    # -- generation -------------------------------------------------------------------
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy continuations cut at the task's stop strings (and EOS), as the HF backend's."""
        eos = self.tok_decode([self.eot_token_id], skip_special_tokens=False)
        results: list = [None] * len(requests)
        groups: dict[str, list[int]] = {}
        for i, request in enumerate(requests):  # one generation setting per batch
            groups.setdefault(repr(sorted(request.args[1].items())), []).append(i)
        progress = tqdm(total=len(requests), disable=disable_tqdm or jax.process_index() != 0,
                        desc="Running generate_until requests")
        for indices in groups.values():
            kwargs = normalize_gen_kwargs(dict(requests[indices[0]].args[1]), self.max_gen_toks)
            if kwargs.get("do_sample") or kwargs.get("temperature", 0.0) > 0:
                raise NotImplementedError("jaxcpt's harness model decodes greedily; set do_sample false / temperature 0")
            until = handle_stop_sequences(kwargs.pop("until", None), eos=eos)
            max_gen_toks = int(kwargs.pop("max_gen_toks"))
            max_context = self.max_length - max_gen_toks
            encoded = {i: self.tok_encode(requests[i].args[0], left_truncate_len=max_context) for i in indices}
            order = sorted(indices, key=lambda i: -len(encoded[i]))
            for start in range(0, len(order), self.batch_size):
                batch = order[start:start + self.batch_size]
                length = bucket(len(encoded[batch[0]]), max_context)
                ids = np.zeros((self.batch_size, length), np.int32)
                mask = np.zeros((self.batch_size, length), np.int32)
                mask[:, -1] = 1  # filler rows: one token, so every row has a real last slot
                for row, index in enumerate(batch):
                    tokens = encoded[index][-length:]
                    ids[row, length - len(tokens):] = tokens  # left-padded: the last slot is real
                    mask[row, :] = 0
                    mask[row, length - len(tokens):] = 1
                tokens, lengths = generate_greedy(nnx.merge(self._graphdef, self.params), self._to_device(ids),
                                                  self._to_device(mask), max_new_tokens=max_gen_toks,
                                                  stop_ids=(self.eot_token_id,))
                tokens, lengths = np.asarray(tokens), np.asarray(lengths)
                for row, index in enumerate(batch):
                    text = self.tok_decode(tokens[row, :lengths[row]].tolist())
                    text = postprocess_generated_text(generation=text, stop=until, think_end_token=None)
                    results[index] = text
                    self.cache_hook.add_partial("generate_until", requests[index].args, text)
                progress.update(len(batch))
        progress.close()
        return results

