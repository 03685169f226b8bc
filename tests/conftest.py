"""Shared fixtures: the real data directory and the built-in SmolLM2 model (loaded once per session)."""
from pathlib import Path

import pytest

DATA_DIR = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(scope="session")
def data_dir() -> str:
    if not DATA_DIR.is_dir():
        pytest.skip(f"real data not found at {DATA_DIR}")
    return str(DATA_DIR)


@pytest.fixture(scope="session")
def smollm2():
    import modelutils
    try:
        return modelutils.load_model(modelutils.BUILTIN_SMOLLM2)
    except modelutils.ModelError as e:
        pytest.skip(str(e))
