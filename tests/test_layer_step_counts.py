"""What one synchronized layer step launches on the Ascend table, held at its targets.

On Ascend each kernel is a launch, and the per-channel ones cost launch latency, not
bandwidth: the count is the cost. One process compiles the training step of
``SyncBatchNorm(64)`` on an 8x64x32x32 input in graph mode over MindSpore's real native
Ascend primitives (the front end runs on CPU; compilation stops at kernel selection), in a
stand-in group of two ranks (ms_syncbn.batchnorm.resolve_group is replaced; the all-reduce is
MindSpore's real AllReduce primitive, which never runs), and counts the validate IR with the
benchmark's own counter (ms_syncbn/_bench_graphs.py, ``python -m ms_syncbn.bench`` prints the
same rows for every table, with mint's). The counts are exact: a change that brings launches
back fails here. The CPU table's counts are held by tests/test_bench_smoke.py (its step runs
under msrun).
"""
import mindspore as ms
import pytest

from ms_syncbn._bench_graphs import ASCEND_DTYPES, step_counts
from ms_syncbn.comm import CommGroup

SHAPE = (8, 64, 32, 32)
# Per layer step: (forward kernels, backward kernels, forward activation-sized, backward
# activation-sized). The targets (float32, float16): forward <= 32, backward <= 16,
# activation-sized 2 and 2. Before issue 16: 84/43 (float32), 84/45 (float16, bfloat16); after
# its first round 43/19 and 43/21. bfloat16: BNTrainingUpdateGrad takes float16/float32, so dy
# and x go in as float32 (two activation-sized casts).
HELD = {
    "float32": (32, 16, 2, 2),
    "float16": (32, 16, 2, 2),
    "bfloat16": (32, 18, 2, 4),
}


@pytest.fixture(scope="module")
def ascend_counts(tmp_path_factory):
    import ms_syncbn.batchnorm as batchnorm

    previous = ms.get_context("mode")
    ms.set_context(device_target="CPU")
    saved = batchnorm.resolve_group
    batchnorm.resolve_group = lambda process_group: CommGroup("hccl_world_group", (0, 1))
    try:
        yield step_counts(SHAPE, str(tmp_path_factory.mktemp("ir")), tables=("Ascend",))
    finally:
        batchnorm.resolve_group = saved
        ms.set_context(mode=previous)


@pytest.mark.parametrize("dtype", ASCEND_DTYPES)
def test_ascend_step_stays_at_its_kernel_counts(ascend_counts, dtype):
    counts = ascend_counts[f"Ascend {dtype}"]
    got = (counts["forward_kernels"], counts["backward_kernels"],
           counts["forward_activation_kernels"], counts["backward_activation_kernels"])
    assert got == HELD[dtype], (dtype, got, counts["forward_kernel_names"],
                                counts["backward_kernel_names"])


@pytest.mark.parametrize("mode, held", [
    # BatchNormReduceGrad as mint calls it: reads dy and x once, and nothing else activation-sized
    ("uncentred", {"float32": (32, 15, 2, 2), "float16": (32, 17, 2, 2), "bfloat16": (33, 17, 3, 2)}),
    # BatchNormReduceGrad on x - mean: one more pass (and in float16/bfloat16 two casts)
    ("centred", {"float32": (32, 17, 2, 3), "float16": (32, 19, 2, 5), "bfloat16": (32, 19, 2, 5)}),
])
def test_switched_backward_reduction_counts(tmp_path, monkeypatch, mode, held):
    """MS_SYNCBN_ASCEND_BACKWARD_REDUCE's other choices, held as exactly as the default.
    (uncentred bfloat16: the forward's cast of x to float32 for BatchNormStats, which takes
    float16 and float32 only, is its own kernel; otherwise it is shared with the backward's.)"""
    import ms_syncbn.batchnorm as batchnorm
    from ms_syncbn.kernels import ascend

    monkeypatch.setenv(ascend.BACKWARD_REDUCE_ENV, mode)
    monkeypatch.setattr(batchnorm, "resolve_group", lambda group: CommGroup("hccl_world_group", (0, 1)))
    monkeypatch.setattr(ascend, "ascend_kernels", ascend.ascend_kernels.__wrapped__)
    counts = step_counts(SHAPE, str(tmp_path), tables=("Ascend",))
    for dtype, want in held.items():
        row = counts[f"Ascend {dtype}"]
        got = (row["forward_kernels"], row["backward_kernels"], row["forward_activation_kernels"],
               row["backward_activation_kernels"])
        assert got == want, (mode, dtype, got, row["backward_kernel_names"])
    if mode == "uncentred":
        assert counts["Ascend float32"]["backward_activation_kernel_names"] == [
            "BatchNormReduceGrad", "BatchNormElemtGrad"]


def test_default_backward_reads_dy_and_x_in_one_reduction_and_one_elementwise_kernel(ascend_counts):
    """The default (BNTrainingUpdateGrad): no activation pass that mint does not make, in float32
    and float16."""
    for dtype in ("float32", "float16"):
        assert ascend_counts[f"Ascend {dtype}"]["backward_activation_kernel_names"] == [
            "BNTrainingUpdateGrad", "BatchNormElemtGrad"], dtype


@pytest.mark.parametrize("dtype", ASCEND_DTYPES)
def test_ascend_step_has_no_branch_one_graph_and_three_collectives(ascend_counts, dtype):
    counts = ascend_counts[f"Ascend {dtype}"]
    assert counts["ran"] is False  # no Ascend kernels on this machine: compiled up to selection
    assert (counts["control_flow_nodes"], counts["graphs"]) == (0, 1), counts
    assert (counts["forward_collectives"], counts["backward_collectives"]) == (2, 1), counts
    for native in ("BatchNormStats", "BatchNormElemt", "BatchNormElemtGrad"):
        assert native in counts["kernel_names"], counts["kernel_names"]


def test_activation_bytes_are_counted_from_the_inferred_types(ascend_counts):
    """float32: BatchNormStats reads x (4 B), BatchNormElemt reads x and writes y (8 B)."""
    assert ascend_counts["Ascend float32"]["forward_activation_bytes_per_element"] == 12.0
    assert ascend_counts["Ascend float16"]["forward_activation_bytes_per_element"] == 6.0
