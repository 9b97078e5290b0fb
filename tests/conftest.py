import pytest


@pytest.fixture(scope="session")
def smol():
    from spectrumkv import load

    return load("smollm2-135m")
