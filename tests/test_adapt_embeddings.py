"""The rows extend-vocab gives new tokens follow the definitions its --help states."""

import numpy as np
import pytest
from adapt_fixtures import byte_level_base, domain_texts, sp_base
from tokenizers import Tokenizer

from jaxcpt.adapt.bpe import BYTE_TOKEN
from jaxcpt.adapt.embeddings import extend_params
from jaxcpt.adapt.model_io import load_source
from jaxcpt.adapt.tokenizer_train import train_bpe, train_sentencepiece
from jaxcpt.adapt.vocab import plan_extension


@pytest.fixture(scope="module")
def sp_case(tmp_path_factory):
    """(source model, extension plan, old tokenizer) for the sentencepiece base (untied embeddings)."""
    root = tmp_path_factory.mktemp("sp")
    sp_base(root / "base")
    train_sentencepiece(domain_texts(400), root / "tokens", 400, base_model=root / "base" / "tokenizer.model")
    source = load_source(root / "base")
    plan = plan_extension(root / "base", str(root / "tokens"), first_id=source.config.vocab_size)
    return source, plan, Tokenizer.from_file(str(root / "base" / "tokenizer.json"))


def _ordinary_old_tokens(tokenizer: Tokenizer) -> dict[str, int]:
    special = {t.content for t in tokenizer.get_added_tokens_decoder().values()}
    return {t: i for t, i in tokenizer.get_vocab(with_added_tokens=False).items()
            if t not in special and not BYTE_TOKEN.match(t)}


def test_subword_mean_row_is_the_mean_of_the_old_pieces(sp_case):
    source, plan, old = sp_case
    params, cfg = extend_params(source.params, source.config, plan, "subword-mean")
    emb, head = source.params["embedding"], source.params["lm_head"]  # [V, E], [E, V]
    for k, token in enumerate(plan.tokens):
        pieces = [t.id for t in old.model.tokenize(token)]
        np.testing.assert_allclose(params["embedding"][plan.first_id + k], emb[pieces].mean(0), rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(params["lm_head"][:, plan.first_id + k], head[:, pieces].mean(1), rtol=1e-6,
                                   atol=1e-7)
    assert cfg.vocab_size == plan.end_id == params["embedding"].shape[0] == params["lm_head"].shape[1]


def test_weighted_row_follows_the_stated_formula(sp_case):
    """sum_u softmax(c/T)_u row(u) over old tokens u inside the new token's string, c(u) = len(u)/len(s)."""
    source, plan, old = sp_case
    temperature = 0.2
    params, _ = extend_params(source.params, source.config, plan, "weighted", temperature=temperature)
    ordinary = _ordinary_old_tokens(old)
    emb = source.params["embedding"].astype(np.float64)
    fallbacks = 0
    for k, token in enumerate(plan.tokens):
        inside = {u: i for u, i in ordinary.items() if u in token}  # substring test, not the module's enumeration
        if inside:
            coverage = np.array([len(u) / len(token) for u in inside])
            weights = np.exp(coverage / temperature) / np.exp(coverage / temperature).sum()
            expected = weights @ emb[list(inside.values())]
        else:  # a character the old tokenizer spelled in bytes: subword-mean over its byte tokens
            expected = emb[[t.id for t in old.model.tokenize(token)]].mean(0)
            fallbacks += 1
        np.testing.assert_allclose(params["embedding"][plan.first_id + k], expected, rtol=1e-5, atol=1e-7)
    assert 0 < fallbacks < 0.2 * len(plan.tokens)


def test_mean_row_is_the_mean_of_every_old_row(sp_case):
    source, plan, old = sp_case
    params, _ = extend_params(source.params, source.config, plan, "mean")
    new_rows = params["embedding"][plan.first_id:]
    old_rows = source.params["embedding"][: source.config.vocab_size]  # not the zero rows padding it to a multiple
    np.testing.assert_allclose(new_rows, np.broadcast_to(old_rows.mean(0), new_rows.shape),
                               rtol=1e-5, atol=1e-7)


def test_random_rows_have_the_initializer_scale_and_noise_adds_to_any_method(sp_case):
    source, plan, _ = sp_case
    random_rows = extend_params(source.params, source.config, plan, "random")[0]["embedding"][plan.first_id:]
    assert abs(random_rows.std() - source.config.initializer_range) < 0.1 * source.config.initializer_range
    plain = extend_params(source.params, source.config, plan, "mean")[0]["embedding"][plan.first_id:]
    noisy = extend_params(source.params, source.config, plan, "mean", noise_std=0.05, seed=3)[0]["embedding"]
    assert abs((noisy[plan.first_id:] - plain).std() - 0.05) < 0.005


def test_old_rows_and_columns_are_copied_exactly(sp_case):
    source, plan, _ = sp_case
    for method in ("subword-mean", "weighted", "mean", "random"):
        params, _ = extend_params(source.params, source.config, plan, method)
        np.testing.assert_array_equal(params["embedding"][: plan.first_id], source.params["embedding"][: plan.first_id])
        np.testing.assert_array_equal(params["lm_head"][:, : plan.first_id], source.params["lm_head"][:, : plan.first_id])
        assert params["layers"] is source.params["layers"]


def test_tied_embeddings_grow_one_table(tmp_path):
    """Qwen-style: tied, and the embedding has rows (ids 403..415) the tokenizer does not use."""
    byte_level_base(tmp_path / "base")
    train_bpe(domain_texts(400), tmp_path / "tokens", 500, base_dir=tmp_path / "base")
    source = load_source(tmp_path / "base")
    plan = plan_extension(tmp_path / "base", str(tmp_path / "tokens"), first_id=source.config.vocab_size)
    assert plan.first_id == 416 and max(plan.existing_ids) == 402  # the unused rows are not averaged in
    params, cfg = extend_params(source.params, source.config, plan, "mean")
    assert "lm_head" not in params and cfg.tie_word_embeddings
    expected = source.params["embedding"][plan.existing_ids].mean(0)
    np.testing.assert_allclose(params["embedding"][plan.first_id], expected, rtol=1e-5, atol=1e-7)


def test_a_token_list_file_adds_words_with_their_intermediates(tmp_path):
    """A list names whole words; the chain of merges that produces each adds the pieces in between."""
    sp_base(tmp_path / "base")
    (tmp_path / "tokens.txt").write_text(" dataframe\n tokenizer\n模型\n")
    source = load_source(tmp_path / "base")
    plan = plan_extension(tmp_path / "base", str(tmp_path / "tokens.txt"), first_id=source.config.vocab_size)
    assert {"\u2581dataframe", "\u2581tokenizer", "模型"} <= set(plan.tokens)
    assert plan.report["from_source"] == 3 and plan.report["intermediates"] == len(plan.tokens) - 3
    assert plan.report["unreachable"] == 0
