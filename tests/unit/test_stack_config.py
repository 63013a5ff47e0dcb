"""The stack's configuration: every bad key named with what to do, nothing launched first; the
example file documents exactly the keys the code knows."""

import re
from pathlib import Path

import pytest
import yaml

from gpu_session.stack.config import KEYS, ConfigError, StackConfig, parse

ROOT = Path(__file__).resolve().parents[2]  # the checkout

EXAMPLE = ROOT / "Pulumi.example.yaml"


def test_the_example_documents_every_key_and_parses():
    text = EXAMPLE.read_text()
    documented = set(re.findall(r"gpu-session:(\w+)", text))
    assert documented == set(KEYS)
    config = parse(yaml.safe_load(text)["config"])
    assert config == StackConfig(model="gpu-session/tiny-chat", maxPricePerHour=1.5)


def test_defaults_and_native_values():
    c = parse({"gpu-session:model": "meta-llama/Llama-3.1-8B-Instruct", "gpu-session:quantize": True, "gpuCount": 2})
    assert (c.cloud, c.gpu, c.gpuCount, c.quantize, c.configure, c.backend, c.hours) == (
        "lambda",
        "auto",
        2,
        True,
        True,
        "auto",
        2.0,
    )


def test_every_bad_key_is_named_at_once_with_what_to_do():
    with pytest.raises(ConfigError) as err:
        parse({"gpu-session:model": "llama; rm -rf /", "gpu-session:cloud": "aws", "gpu-session:gpuCount": "two",
               "gpu-session:hours": "-1", "gpu-session:modle": "x", "aws:region": "us-east-1"})  # fmt: skip
    message = str(err.value)
    assert "gpu-session:model must be a Hugging Face model id like" in message
    assert "gpu-session:cloud must be lambda or runpod (got 'aws')" in message
    assert "gpu-session:gpuCount must be a whole number of at least 1" in message
    assert "gpu-session:hours must be a number above 0" in message
    assert "gpu-session:modle is not a setting; did you mean gpu-session:model?" in message
    assert "aws:region" not in message


def test_a_missing_model_says_how_to_set_it():
    with pytest.raises(ConfigError, match="model is required: pulumi config set model"):
        parse({"gpu-session:cloud": "runpod"})


def test_secrets_never_appear_in_errors_or_reprs():
    with pytest.raises(ConfigError) as err:
        parse({"model": "a/b", "hfToken": "hf_secret\nvalue"})
    assert "hf_secret" not in str(err.value) and "(secret)" in str(err.value)
    assert "hf_abc" not in repr(parse({"model": "a/b", "hfToken": "hf_abc"}))


def test_every_config_key_the_readme_and_the_ci_example_set_is_a_setting():
    """The README's CLI steps and examples/github-actions.yml type `pulumi config set KEY …`: each
    key must be one the program takes (a typo there would fail only on a real cloud)."""
    for doc in ("README.md", "examples/github-actions.yml"):
        keys = re.findall(r"pulumi config set (?:--secret )?([A-Za-z]+)", (ROOT / doc).read_text())
        assert keys and [k for k in keys if k not in KEYS] == [], doc
