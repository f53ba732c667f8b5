"""One process, no init(): where a compiled step puts the layers' collectives (test_collective_placement).

    MS_DEV_SAVE_GRAPHS=1 MS_DEV_SAVE_GRAPHS_PATH=DIR python tests/workers/backward_collective_placement.py

A residual block (SyncBatchNorms b2 and bs on parallel branches after b1) takes one gradient
step in GRAPH_MODE on CPU. The layers believe they are in a group of two ranks
(ms_syncbn.batchnorm.resolve_group is replaced), and their all-reduce is a stand-in that sums
two identical ranks (x * 2, an ops.Custom pyfunc), so the compiled step is the one a real
2-rank job compiles, with the stand-in where the AllReduce kernels are; MindSpore writes its
kernel graphs to DIR. Prints "rel err E" against nn.BatchNorm2d on the same batch (two
identical ranks have the local batch's statistics).
"""
import numpy as np
import mindspore as ms
from mindspore import Tensor, nn, ops

ms.set_context(mode=ms.GRAPH_MODE, device_target="CPU")

import ms_syncbn.batchnorm as batchnorm  # noqa: E402  (after set_context: the layer reads the target)
from ms_syncbn.comm import CommGroup  # noqa: E402

STAND_IN_GROUP = CommGroup("stand_in_two_ranks", (0, 1))


def two_identical_ranks_sum(group):
    """Stand-in for ms_syncbn.comm.all_reduce_sum: the sum over two ranks holding the same data."""
    assert group == STAND_IN_GROUP
    return ops.Custom(lambda x: x * 2, out_shape=lambda x: x, out_dtype=lambda x: x, func_type="pyfunc")


batchnorm.resolve_group = lambda process_group: STAND_IN_GROUP
batchnorm.all_reduce_sum = two_identical_ranks_sum


class Block(nn.Cell):
    def __init__(self, bn):
        super().__init__()
        ms.set_seed(1)
        self.c1 = nn.Conv2d(4, 8, 3, weight_init="normal"); self.b1 = bn(8)
        self.c2 = nn.Conv2d(8, 8, 3, weight_init="normal"); self.b2 = bn(8)
        self.cs = nn.Conv2d(4, 8, 1, weight_init="normal"); self.bs = bn(8)

    def construct(self, x, dy):
        h = ops.relu(self.b1(self.c1(x)))
        h = ops.relu(self.b2(self.c2(h)) + self.bs(self.cs(x)))
        return (h * dy).sum()


def main():
    rng = np.random.default_rng(0)
    x = Tensor(rng.normal(size=(3, 4, 6, 6)).astype(np.float32))
    dy = Tensor(rng.normal(size=(3, 8, 6, 6)).astype(np.float32))
    nets = []
    for bn in (batchnorm.SyncBatchNorm, nn.BatchNorm2d):
        net = Block(bn)
        net.set_train(True)
        nets.append(ms.grad(net, grad_position=0)(x, dy).asnumpy())
    synced, reference = nets
    print("rel err", float(np.abs(synced - reference).max() / np.abs(reference).max()), flush=True)


if __name__ == "__main__":
    main()
