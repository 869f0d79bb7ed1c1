from __future__ import annotations

import os
from pathlib import Path

import pytest

# The shared, read-only data beside the checkout (real images, weights, a foreign TFLite model).
SHARED = Path(os.environ.get("YUGAMI_SHARED", Path(__file__).resolve().parents[1].parent / "shared"))


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    if not SHARED.is_dir():
        pytest.skip(f"shared data folder {SHARED} is absent; set YUGAMI_SHARED")
    return SHARED


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real int8 TFLite bundle made from code (needs TensorFlow, built once per session)."""
    from tests.builders import build_tiny_bundle

    return build_tiny_bundle(tmp_path_factory.mktemp("bundles") / "tiny")
