"""The long run's training plan: the same on every rank and in the test (NumPy only).

A net of LAYERS SyncBatchNorm layers, each followed by tanh:
``h_k = tanh(bn_k(h_{k-1}))`` over the layers chosen for the step, in order; the
loss is ``sum(h_last * upstream)``; plain SGD on every weight and bias with the
gradient summed over the ranks (data parallelism), learning rate LEARNING_RATE.
Every step draws, from a seed shared by all ranks, the ranks' batch sizes
(zeros included, so some steps have an empty group batch), the layers used
(a subset from LAYER_SUBSETS, the same on every rank) and the group's batch and upstream gradient;
rank r keeps rows ``offsets[r]:offsets[r+1]`` of both.
"""
from typing import NamedTuple, Tuple

import numpy as np

STEPS = 300
SAVE_AT = 150  # a checkpoint is saved after this many steps; the restarted run loads it
CHANNELS = 4
TAIL = (CHANNELS, 3)  # input (N, C, 3)
LAYERS = 3
MOMENTA = (0.1, None, 0.3)  # None: cumulative moving average (uses num_batches_tracked)
EPS = 1e-5
LEARNING_RATE = 0.02
# Graph mode compiles one graph per (subset of layers, local batch size), twice (the restarted
# run is a fresh model), and compiling is most of the job's time: few of each.
# Local batch sizes to draw from: uneven, zero included.
LOCAL_BATCH_SIZES = (0, 1, 3)
# Layer subsets to draw from: every layer is skipped by some, and one feeds layer 2 from layer 0.
LAYER_SUBSETS = ((0, 1, 2), (0, 2), (1,))
SEED = 20240605
RSS_EVERY = 25  # steps between resident-memory samples


class StepPlan(NamedTuple):
    sizes: Tuple[int, ...]  # local batch size of each rank
    layers: Tuple[int, ...]  # indices of the layers used, in order
    x: np.ndarray  # (sum(sizes), *TAIL) float32, the group's batch
    upstream: np.ndarray  # like x, float32: d loss / d output

    def rows(self, rank):
        start = sum(self.sizes[:rank])
        return slice(start, start + self.sizes[rank])


def step_plan(step: int, world: int) -> StepPlan:
    rng = np.random.default_rng([SEED, 1, step])
    sizes = tuple(int(n) for n in rng.choice(LOCAL_BATCH_SIZES, size=world))
    layers = LAYER_SUBSETS[int(rng.integers(len(LAYER_SUBSETS)))]
    # per-channel means that drift over the run (exercises the layer's re-centring)
    mean = 3.0 + np.arange(CHANNELS) - 0.01 * step
    scale = 0.5 + 0.5 * np.arange(CHANNELS)
    shape = (sum(sizes),) + TAIL
    x = (mean[:, None] + scale[:, None] * rng.normal(size=shape)).astype(np.float32)
    upstream = rng.normal(size=shape).astype(np.float32)
    return StepPlan(sizes, layers, x, upstream)


def initial_parameters():
    """weight (LAYERS, C), bias (LAYERS, C), float32: the first model's initial state."""
    rng = np.random.default_rng([SEED, 0])
    weight = rng.uniform(0.5, 1.5, size=(LAYERS, CHANNELS)).astype(np.float32)
    bias = rng.normal(0.0, 0.3, size=(LAYERS, CHANNELS)).astype(np.float32)
    return weight, bias
