"""The configuration reference: every key documented, `nested-reft config` prints it, docs/configuration.md is current."""
import dataclasses
import subprocess
import sys
import typing
from pathlib import Path

import pytest

from nested_reft_ds.config import ConfigError, ExperimentConfig, field_docs, load_config, reference_markdown

REPO = Path(__file__).resolve().parents[1]


def test_every_config_field_has_a_docstring():
    sections = typing.get_type_hints(ExperimentConfig)
    undocumented = [f"{name}.{item.name}" for name, cls in sections.items() for item in dataclasses.fields(cls)
                    if not field_docs(cls).get(item.name)]
    undocumented += [name for name in sections if not field_docs(ExperimentConfig).get(name)]
    assert not undocumented


def test_docs_configuration_md_is_the_generated_reference():
    current = (REPO / "docs" / "configuration.md").read_text()
    assert current.rstrip("\n") == reference_markdown().rstrip("\n"), \
        "docs/configuration.md is stale: regenerate it with `nested-reft config --markdown > docs/configuration.md`"


def test_nested_reft_config_prints_every_key_with_type_default_and_meaning():
    out = subprocess.run([sys.executable, "-m", "nested_reft_ds.cli", "config"], capture_output=True, text=True,
                         check=True, cwd=REPO).stdout
    assert "  algorithm.correction = token_tis    (one of 'none', 'seq_is', 'token_tis', 'token_mis', 'seq_mis')" in out
    assert "  skip.ramp_steps = 0    (int)" in out
    for name, cls in typing.get_type_hints(ExperimentConfig).items():
        for item in dataclasses.fields(cls):
            assert f"  {name}.{item.name} = " in out


@pytest.mark.parametrize("old, new", [("train.warmup_steps", "train.lr_warmup_steps"),
                                      ("skip.warmup_steps", "skip.ramp_steps")])
def test_renamed_keys_name_their_new_name(old, new):
    with pytest.raises(ConfigError, match=f"'{old}' is now '{new}'"):
        load_config(None, [f"{old}=3"])
