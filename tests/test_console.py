"""A converted network prints nothing on the console that the unconverted one does not.

tests/workers/console_step.py trains a small network as a user's script would, first with
nn.BatchNorm2d ("plain"), then converted to SyncBatchNorm (the CPU table, and the emulated
Ascend table), in PyNative and graph mode, with MindSpore's default log level (warnings on).
Each console line of MindSpore's log (``[WARNING]``/``[ERROR]``) or of Python's warnings that
shows in a converted phase must also show in a plain one. Two runs, started together: one
process (the layers are local, as when debugging a script) and 2 ranks under msrun (init() and
DATA_PARALLEL: the layers synchronize).
"""
import os
import re
import subprocess
import sys

import pytest

from tests.harness import WORKERS, start_msrun

WORKER = WORKERS / "console_step.py"
PHASE_MARK = "=== console phase: "
CONVERTED_PHASES = [f"{mode} {table}" for mode in ("pynative", "graph")
                    for table in ("converted", "converted-ascend")]
PLAIN_PHASES = ["pynative plain", "graph plain"]

# "[WARNING] ANALYZER(4243,7fea54470b80,python):2026-12-04-17:20:01.625.520 [file:line] text"
_MINDSPORE_LOG = re.compile(r"^\[(WARNING|ERROR|CRITICAL)\] (\w+)\([^)]*\):\S+ (.*)$")
_PYTHON_WARNING = re.compile(r"\w*Warning: ")


def console_lines_by_phase(text):
    """{phase: set of console lines} of a worker's output, from its first phase marker on.
    A line is MindSpore's log line without process, thread and time, or a Python warning;
    numbers become '#' (graph and node names carry counters)."""
    phases, phase = {}, None
    for line in text.splitlines():
        if line.startswith(PHASE_MARK):
            phase = line[len(PHASE_MARK):].strip()
            phases[phase] = set()
            continue
        if phase is None:
            continue
        found = _MINDSPORE_LOG.match(line)
        if found:
            line = f"[{found.group(1)}] {found.group(2)} {found.group(3)}"
        elif not _PYTHON_WARNING.search(line):
            continue
        phases[phase].add(re.sub(r"\d+", "#", line.strip()))
    return phases


# Lines that only running the Ascend table on CPU causes (the emulated tier), never a user's job:
# MindSpore's CPU backend has no SplitWithSize kernel and expands it into other operators; in a
# synchronized step compiled for dynamic shapes that expansion warns. On an NPU the native
# SplitWithSize kernel runs (not checked here: no NPU), and the CPU table has no such split there.
EMULATION_ONLY = re.compile(r"expander_fallback\.cc.*IbTryExpandCNode.*SplitWithSize")


def lines_only_converted(phases):
    """{converted phase: lines it shows that no plain phase shows}; every phase must be there."""
    missing = [p for p in PLAIN_PHASES + CONVERTED_PHASES + ["done"] if p not in phases]
    assert not missing, f"the worker did not reach the phases {missing}"
    plain = set().union(*(phases[p] for p in PLAIN_PHASES))
    extra = {}
    for phase in CONVERTED_PHASES:
        lines = sorted(line for line in phases[phase] - plain
                       if not (phase.endswith("-ascend") and EMULATION_ONLY.search(line)))
        if lines:
            extra[phase] = lines
    return extra


@pytest.fixture(scope="module")
def outputs(tmp_path_factory):
    """{"one process": output, "rank r": output}: both runs, started together."""
    env = dict(os.environ, GLOG_v="2")  # MindSpore's default: warnings show
    job = start_msrun(WORKER, 2, tmp_path_factory.mktemp("console"), "--emulate-ascend",
                      timeout=300, env=env)
    alone = subprocess.run([sys.executable, str(WORKER), "--emulate-ascend"], env=env,
                           cwd=WORKERS.parents[1], stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True, timeout=300)
    assert alone.returncode == 0, alone.stdout[-4000:]
    result = job.result()
    assert result.returncode == 0, f"{result.stdout[-3000:]}\n{result.logs()}"
    out = {"one process": alone.stdout}
    for rank in range(2):
        out[f"rank {rank}"] = (result.log_dir / f"worker_{rank}.log").read_text(errors="replace")
    return out


@pytest.mark.parametrize("run", ["one process", "rank 0", "rank 1"])
def test_converted_network_prints_nothing_the_plain_one_does_not(outputs, run):
    extra = lines_only_converted(console_lines_by_phase(outputs[run]))
    assert not extra, f"{run}: console lines only the converted network printed: {extra}"


def test_the_check_sees_a_warning_the_layer_causes():
    """The line MindSpore 2.10 printed for every converted step before the layer stopped
    discarding an output of its synchronized function (auto_monad's isolated-node warning)."""
    split_warning = ("[WARNING] SESSION(1,7f,python):2026-12-04-19:30:00.000.000 [mindspore/ccsrc/backend/"
                     "common/expander/fallback/expander_fallback.cc:120] IbTryExpandCNode] After "
                     "expanding cnode Default/SyncBatchNorm/SplitWithSize-op1, the new abstract ...")
    text = "\n".join([
        f"{PHASE_MARK}pynative plain", f"{PHASE_MARK}graph plain",
        f"{PHASE_MARK}pynative converted",
        "[WARNING] ANALYZER(4243,7fea54470b80,python):2026-12-04-17:20:01.625.520 "
        "[mindspore/ccsrc/frontend/jit/ps/static_analysis/auto_monad.cc:1606] ClearIsolatedNodes] "
        "Some side effect nodes were eliminated by mistake. The node is:@55__train_body_52",
        f"{PHASE_MARK}graph converted", "/x.py:3: UserWarning: something", split_warning,
        f"{PHASE_MARK}pynative converted-ascend", f"{PHASE_MARK}graph converted-ascend",
        split_warning, f"{PHASE_MARK}done"])
    extra = lines_only_converted(console_lines_by_phase(text))
    assert set(extra) == {"pynative converted", "graph converted"}
    assert "ClearIsolatedNodes" in extra["pynative converted"][0]
    assert any("SplitWithSize" in line for line in extra["graph converted"])  # not on CPU's table
