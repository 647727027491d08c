"""Fixtures the service tests share."""
import pytest

from ssd.config import EngineConfig
from ssd.engine import ModelPair


@pytest.fixture(scope="session")
def pair():
    """The real default pair (SmolLM2 target, shipped draft), loaded once for every module here."""
    return ModelPair.load(EngineConfig(mode="ar"))
