"""prefect.yaml's pull step: a deployment made without VIT_PIPELINE_CHECKOUT says so in one line."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from vit_pipeline.flows.steps import checkout

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("directory", ["", "{{ $VIT_PIPELINE_CHECKOUT }}", "/nonexistent", "/tmp"])
def test_a_deployment_without_its_checkout_fails_in_one_line(directory):
    with pytest.raises(RuntimeError) as err:
        checkout(directory)
    message = str(err.value)
    assert (
        message.startswith("Expected VIT_PIPELINE_CHECKOUT to name a checkout of vit-pipeline")
        and "\n" not in message
    )
    assert "VIT_PIPELINE_CHECKOUT=$PWD prefect --no-prompt deploy --all" in message


def test_the_checkout_is_entered(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    assert checkout(str(ROOT)) == {"directory": str(ROOT)} and os.getcwd() == str(ROOT)
