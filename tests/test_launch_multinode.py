"""launch/: every script's --help, and a two-"node" msrun job that synchronizes as one group.

The multi-node test starts launch/run_multinode.sh twice on this machine, as node 0 and
node 1 of a 4-rank job (2 local ranks each, master 127.0.0.1, one free port, a log
directory per node, a hard timeout that kills both process groups). Each rank runs one
SyncBatchNorm training step on its uneven slice of one global batch
(tests/workers/launch_sync_check.py); the results must equal tests/reference.py over the
concatenation of all 4 slices, which only holds if all 4 ranks formed one group.
"""
import os
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from tests import reference
from tests.harness import WORKERS, free_port
from tests.workers import launch_sync_check as job

ROOT = Path(__file__).resolve().parents[1]
LAUNCH = ROOT / "launch"
SCRIPTS = ("run_cpu.sh", "run_ascend_node.sh", "run_multinode.sh")


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_describes_usage_and_forwarding(script):
    done = subprocess.run(["bash", str(LAUNCH / script), "--help"], capture_output=True,
                          text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"Usage: bash launch/{script}")
    assert "training script" in done.stdout  # says where extra arguments go


def test_multinode_rejects_missing_and_bad_arguments():
    script = str(LAUNCH / "run_multinode.sh")
    missing = subprocess.run(["bash", script, "--master-addr", "127.0.0.1", "--master-port", "1"],
                             capture_output=True, text=True, timeout=30)
    assert missing.returncode == 2 and "--node-rank is required" in missing.stderr
    bad = subprocess.run(["bash", script, "--node-rank", "2", "--nodes", "2", "--master-addr",
                          "127.0.0.1", "--master-port", "1"], capture_output=True, text=True,
                         timeout=30)
    assert bad.returncode == 2 and "--node-rank must be in 0 .. 1, but got '2'" in bad.stderr


def _start_node(node_rank, port, tmp_path, out_dir):
    log_dir = tmp_path / f"node{node_rank}_log"
    cmd = ["bash", str(LAUNCH / "run_multinode.sh"), "--node-rank", str(node_rank),
           "--master-addr", "127.0.0.1", "--master-port", str(port), "--nodes", "2",
           "--local-ranks", "2", "--log-dir", str(log_dir), "--timeout", "90",
           "--script", str(WORKERS / "launch_sync_check.py"), "--", "--out", str(out_dir)]
    env = dict(os.environ, GLOG_v="3", OMP_NUM_THREADS="1")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env, start_new_session=True)
    return proc, log_dir


def _logs(log_dir):
    return "\n".join(f"===== {p}\n{p.read_text(errors='replace')[-3000:]}"
                     for p in sorted(log_dir.glob("*.log")))


def test_two_nodes_synchronize_as_one_group(tmp_path):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    port = free_port()
    nodes = [_start_node(rank, port, tmp_path, out_dir) for rank in (0, 1)]
    deadline = time.monotonic() + 240
    outputs = []
    try:
        for proc, _ in nodes:
            stdout, _ = proc.communicate(timeout=max(deadline - time.monotonic(), 1))
            outputs.append(stdout)
    except subprocess.TimeoutExpired:
        for proc, _ in nodes:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail("two-node msrun job timed out\n" + "\n".join(_logs(d) for _, d in nodes))
    for (proc, log_dir), stdout in zip(nodes, outputs):
        assert proc.returncode == 0, f"{stdout[-3000:]}\n{_logs(log_dir)}"
    # Ranks are numbered node by node: node 1 ran ranks 2 and 3.
    assert sorted(p.name for p in nodes[1][1].glob("worker_*.log")) == ["worker_2.log",
                                                                        "worker_3.log"]

    world = 4
    results = [np.load(out_dir / f"rank{r}.npz") for r in range(world)]
    assert [int(res["rank"]) for res in results] == [0, 1, 2, 3]
    assert all(int(res["world"]) == world for res in results), "ranks are not one 4-rank group"

    x, dy = job.global_batch(world)
    weight, bias = job.affine_params()
    y_ref = reference.forward(x, weight, bias, job.EPS)
    dx_ref, _, _ = reference.backward(x, dy, weight, job.EPS)
    mean, var, _ = reference.batch_stats(x)
    xhat = (x - mean.reshape(1, -1, 1, 1)) / np.sqrt(var + job.EPS).reshape(1, -1, 1, 1)
    running_mean, running_var = np.zeros(job.CHANNELS), np.ones(job.CHANNELS)
    for tracked in (1, 2):  # two training steps on the same global batch
        running_mean, running_var = reference.running_update(running_mean, running_var, x,
                                                             job.MOMENTUM, tracked)
    for rank, res in enumerate(results):
        part = job.rank_slice(world, rank)
        what = f"rank {rank}"
        np.testing.assert_allclose(res["y"], y_ref[part], rtol=1e-4, atol=1e-4, err_msg=what)
        np.testing.assert_allclose(res["dx"], dx_ref[part], rtol=1e-4, atol=1e-4, err_msg=what)
        # weight/bias gradients are this rank's share (data parallelism sums them).
        np.testing.assert_allclose(res["dweight"], (dy[part] * xhat[part]).sum(axis=(0, 2, 3)),
                                   rtol=1e-4, atol=1e-4, err_msg=what)
        np.testing.assert_allclose(res["dbias"], dy[part].sum(axis=(0, 2, 3)),
                                   rtol=1e-4, atol=1e-4, err_msg=what)
        np.testing.assert_allclose(res["running_mean"], running_mean, rtol=1e-5, atol=1e-6,
                                   err_msg=what)
        np.testing.assert_allclose(res["running_var"], running_var, rtol=1e-5, atol=1e-6,
                                   err_msg=what)
