import pytest
import torch

from stepflash.config import tiny


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def tiny_config():
    return tiny()
