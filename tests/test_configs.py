"""Every YAML under configs/ loads as a valid TrainConfig (the generated docs tables: tests/test_docs_generated.py)."""

from pathlib import Path

import pytest

from jaxcpt.train.config import load_train_config

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_config_loads(path):
    cfg = load_train_config(str(path))
    assert cfg.train.steps > 0 and cfg.data.sources
