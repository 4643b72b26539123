"""Every YAML under configs/ loads as a valid TrainConfig; the README's config reference is current."""

from pathlib import Path

import pytest

from jaxcpt.config_reference import FAMILIES_BEGIN, FAMILIES_END, families_markdown, markdown
from jaxcpt.hf.families import FAMILIES
from jaxcpt.train.config import load_train_config

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_config_loads(path):
    cfg = load_train_config(str(path))
    assert cfg.train.steps > 0 and cfg.data.sources


def test_readme_config_reference_is_generated_from_the_dataclasses():
    readme = (ROOT / "README.md").read_text()
    begin, end = "<!-- config-reference:begin -->", "<!-- config-reference:end -->"
    assert begin in readme and end in readme
    current = readme.split(begin)[1].split(end)[0].strip()
    assert current == markdown().strip(), "regenerate with: jaxcpt config-reference --update README.md"


def test_readme_families_table_is_generated_from_the_family_modules():
    readme = (ROOT / "README.md").read_text()
    assert FAMILIES_BEGIN in readme and FAMILIES_END in readme
    current = readme.split(FAMILIES_BEGIN)[1].split(FAMILIES_END)[0].strip()
    assert current == families_markdown().strip(), "regenerate with: jaxcpt config-reference --update README.md"
    for family in FAMILIES:
        assert f"| {family} |" in current
