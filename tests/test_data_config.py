"""The data config: defaults load, stages in both spellings, mistakes named precisely."""

import pytest
import yaml

from jaxcpt.config import ConfigError, describe, from_dict, to_dict
from jaxcpt.data.config import DataConfig, MixtureStage

YAML = """
tokenizer: tok.model
sources:
  - {name: medical, paths: ["/data/med/*.jsonl"], weight: 0.95, eval_fraction: 0.01}
  - {name: replay, paths: ["/data/web"], weight: 0.05, eval_documents: 100}
stages:
  - [1000, {medical: 0.8, replay: 0.2}]
  - {lr_below: 0.5, ramp_steps: 200, weights: {medical: 0.5, replay: 0.5}}
"""


def test_defaults_are_valid_and_every_field_is_documented():
    DataConfig().validate()
    rows = describe(DataConfig)
    assert all(help_text for _, _, _, help_text in rows), [key for key, _, _, h in rows if not h]


def test_stages_as_pairs_or_mappings_become_mixture_stages():
    cfg = from_dict(DataConfig, yaml.safe_load(YAML), prefix="data")
    assert cfg.stages == [
        MixtureStage(weights={"medical": 0.8, "replay": 0.2}, step=1000),
        MixtureStage(weights={"medical": 0.5, "replay": 0.5}, lr_below=0.5, ramp_steps=200),
    ]
    assert from_dict(DataConfig, to_dict(cfg), prefix="data") == cfg  # round trip through YAML values


@pytest.mark.parametrize(
    "change,message",
    [
        ({"stages": [[10, {"medicl": 1.0}]]}, "did you mean 'medical'"),
        ({"stages": [{"weights": {"medical": 1.0}}]}, "exactly one of step or lr_below"),
        ({"stages": [{"step": 5, "lr_below": 0.5, "weights": {"medical": 1.0}}]}, "exactly one of step or lr_below"),
        ({"stages": [[10, {"medical": 0.0}]]}, "positive weight"),
        ({"seq_len": 1}, "seq_len"),
        ({"packing": "best_fit"}, "first_fit"),
    ],
)
def test_mistakes_are_named(change, message):
    data = {**yaml.safe_load(YAML), **change}
    with pytest.raises(ConfigError, match=message):
        from_dict(DataConfig, data, prefix="data")


def test_source_mistakes_are_named():
    base = {"name": "web", "paths": ["x.jsonl"]}
    for extra, message in [
        ({"eval_fraction": 0.1, "eval_documents": 5}, "not both"),
        ({"weight": -1}, "weight must be >= 0"),
        ({"name": "a b"}, "source name"),
        ({"paths": []}, "paths is empty"),
    ]:
        with pytest.raises(ConfigError, match=message):
            from_dict(DataConfig, {"sources": [{**base, **extra}]}, prefix="data")
    with pytest.raises(ConfigError, match="duplicate source names"):
        from_dict(DataConfig, {"sources": [base, base]}, prefix="data")


def test_a_misspelled_key_inside_a_stage_is_named_with_its_suggestion():
    """A stage is a MixtureStage or a (step, weights) pair; a mapping can only mean the first, so its own
    error (the unknown key and the close match) is what the user sees, not 'fits none of ...'."""
    from jaxcpt.config import ConfigError
    from jaxcpt.train.config import load_train_config

    with pytest.raises(ConfigError, match=r"unknown config key 'data.stages\[0\].batch_sze'; did you mean "
                                          r"'data.stages\[0\].batch_size'"):
        load_train_config(None, ["data.sources=[{name: a, paths: [x]}]", "data.stages=[{seq_len: 64, batch_sze: 2}]"])
