"""Shared pytest fixtures."""
import mindspore as ms
import pytest


@pytest.fixture(scope="module")
def pynative_cpu():
    """Run a module's tests in PyNative mode on CPU, restoring the previous mode afterwards."""
    previous = ms.get_context("mode")
    ms.set_context(mode=ms.PYNATIVE_MODE, device_target="CPU")
    yield
    ms.set_context(mode=previous)
