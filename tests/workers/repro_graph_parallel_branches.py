"""Reproduction of the known graph-mode issue (README, Known issues); not part of the suite.

Run: msrun --worker_num=2 --local_worker_num=2 --master_port=PORT --log_dir=DIR --join=True \
     --cluster_time_out=60 tests/workers/repro_graph_parallel_branches.py [--dispatch-threads K]
     [--sizes 3,4]
(any number of ranks; tests/workers/stress_parallel_branches.py runs it many times).
A residual block with SyncBatchNorm on two parallel branches, trained with ms.grad in
GRAPH_MODE on CPU ranks with uneven batches, compared with nn.BatchNorm2d on the
concatenated batch. If the CPU runtime issues the two branches' backward all-reduces in
different orders on different ranks, the backward layer-identity check stops the step
(RuntimeError, guard code 4; before any check existed, dx was wrong by 6-12% relative).
Each rank prints one line "RESULT PASS" (dx matches), "RESULT FAIL" (dx wrong: the check
missed a mis-pairing) or "RESULT STOPPED <message>" (the check stopped a step).
`--dispatch-threads K` runs MindSpore's runtime with K dispatch threads; `--sizes` gives the
per-rank batch sizes (default 3, 4, 3, 4, ...; 0 makes a rank empty).
"""
import argparse

import numpy as np
import mindspore as ms
from mindspore import Tensor, nn, ops
from mindspore.communication import get_group_size, get_rank, init

parser = argparse.ArgumentParser()
parser.add_argument("--dispatch-threads", type=int, default=0)
parser.add_argument("--sizes", default="", help="comma-separated batch size per rank")
args, _ = parser.parse_known_args()  # run_msrun also passes --out DIR
if args.dispatch_threads:
    ms.runtime.dispatch_threads_num(args.dispatch_threads)
ms.set_context(mode=ms.GRAPH_MODE, device_target="CPU")
init()
from ms_syncbn import SyncBatchNorm  # noqa: E402  (after init: the layer resolves its group)

r, world = get_rank(), get_group_size()
sizes = ([int(n) for n in args.sizes.split(",")] if args.sizes
         else [3 + (k % 2) for k in range(world)])  # uneven: 3, 4, 3, 4, ...
assert len(sizes) == world, f"--sizes needs {world} values"


def make(bn):
    class Block(nn.Cell):
        def __init__(self):
            super().__init__()
            ms.set_seed(1)
            self.c1 = nn.Conv2d(4, 8, 3, weight_init="normal"); self.b1 = bn(8)
            self.c2 = nn.Conv2d(8, 8, 3, weight_init="normal"); self.b2 = bn(8)
            self.cs = nn.Conv2d(4, 8, 1, weight_init="normal"); self.bs = bn(8)
            self.c3 = nn.Conv2d(8, 8, 3, weight_init="normal"); self.b3 = bn(8)
            self.cs2 = nn.Conv2d(8, 8, 1, weight_init="normal"); self.bs2 = bn(8)

        def construct(self, x, dy):
            h = ops.relu(self.b1(self.c1(x)))
            h = ops.relu(self.b2(self.c2(h)) + self.bs(self.cs(x)))
            h = ops.relu(self.b3(self.c3(h)) + self.bs2(self.cs2(h)))
            return (h * dy).sum()
    net = Block(); net.set_train(True); return net


sync = make(SyncBatchNorm); ref = make(lambda c: nn.BatchNorm2d(c))
gs = ms.grad(sync, grad_position=0); gr = ms.grad(ref, grad_position=0)
rng = np.random.default_rng(0)
bad = 0
stopped = ""
for step in range(3):
    x = rng.normal(size=(sum(sizes), 4, 6, 6)).astype(np.float32)
    dy = rng.normal(size=(sum(sizes), 8, 6, 6)).astype(np.float32)
    sl = slice(sum(sizes[:r]), sum(sizes[:r + 1]))
    try:
        d_sync = gs(Tensor(x[sl]), Tensor(dy[sl])).asnumpy()
    except RuntimeError as err:
        stopped = str(err).split("Error message is ")[-1].splitlines()[0]
        break
    d_ref = gr(Tensor(x), Tensor(dy)).asnumpy()[sl]
    err = np.abs(d_sync - d_ref).max() / np.abs(d_ref).max() if d_ref.size else 0.0
    bad += err > 1e-4
    print(r, "step", step, "rel err", err, flush=True)
print(r, "RESULT", f"STOPPED {stopped}" if stopped else "FAIL" if bad else "PASS", flush=True)
