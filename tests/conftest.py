"""Shared fixtures: one tiny LM zoo per test session."""

from __future__ import annotations

import pytest
import torch

#: Devices the device-dependent tests run on: the CPU always, CUDA too where a GPU is present
#: (CI has none; a GPU machine runs the same tests on both).
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(scope="module", params=DEVICES)
def device(request):
    """The device a module's resident merger lives on."""
    return request.param


@pytest.fixture(scope="session")
def tiny_zoo(tmp_path_factory):
    """The tiny LM zoo, built once per session (a few seconds)."""
    from evomerge.zoo import build_zoo

    return build_zoo("lm", "tiny", tmp_path_factory.mktemp("zoo") / "lm-tiny", seed=0)


@pytest.fixture(scope="session")
def tiny_vision_zoo(tmp_path_factory):
    """The tiny vision zoo (ViT + 4 digit-image task fine-tunes), built once per session (~10 s)."""
    from evomerge.zoo import build_zoo

    return build_zoo("vision", "tiny", tmp_path_factory.mktemp("zoo") / "vision-tiny", seed=0)
