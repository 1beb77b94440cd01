"""Shared pytest fixtures."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def tritonserver():
    """A real tritonserver on free local ports serving model_repository/, started once per session.
    Skips (with the fix) when Triton is not installed."""
    from fluxshard.serving.tritonserver import TritonNotInstalled, TritonServer, find_triton

    try:
        find_triton()
    except TritonNotInstalled as e:
        pytest.skip(str(e))
    with TritonServer() as server:
        yield server
