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


# Files whose msrun jobs take longest, started first: with `-n 2 --dist loadfile` (README) the
# two workers then finish close together instead of one running a long job alone at the end.
LONGEST_FIRST = ("test_long_run.py", "test_ascend_emulated.py", "test_layer_identity.py",
                 "test_amp_training.py", "test_bench_smoke.py", "test_reliability.py",
                 "test_console.py")


def pytest_collection_modifyitems(items):
    """Order the test files longest job first (a stable sort: tests within a file keep their order)."""
    def rank(item):
        name = item.path.name
        return LONGEST_FIRST.index(name) if name in LONGEST_FIRST else len(LONGEST_FIRST)

    items.sort(key=rank)
