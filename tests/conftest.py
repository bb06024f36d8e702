import pytest

from support import tiny_config


@pytest.fixture
def make_config():
  return tiny_config
