"""Shared fixtures: one tiny LM zoo per test session."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def tiny_zoo(tmp_path_factory):
    """The tiny LM zoo, built once per session (a few seconds)."""
    from evomerge.zoo import build_zoo

    return build_zoo("lm", "tiny", tmp_path_factory.mktemp("zoo") / "lm-tiny", seed=0)
