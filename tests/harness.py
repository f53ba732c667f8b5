"""Launch a worker script on several ranks with msrun, from pytest.

Every job gets a free port, its own log directory and a hard timeout after
which the whole process group is killed, so no test can hang the suite. Jobs that
mostly wait (fault jobs waiting out a timeout) can be started together
(``start_msrun``) and awaited later.
Workers write their results to ``out_dir`` (one file per rank); the test then
checks them against tests/reference.py.
"""
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

WORKERS = Path(__file__).resolve().parent / "workers"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class MsrunResult:
    returncode: int
    log_dir: Path
    out_dir: Path
    elapsed: float
    stdout: str
    ended_wall: float = None  # time.time() when msrun exited

    def logs(self) -> str:
        """All worker and scheduler logs, for failure messages."""
        parts = []
        for path in sorted(self.log_dir.glob("*.log")):
            parts.append(f"===== {path.name}\n{path.read_text(errors='replace')[-6000:]}")
        return "\n".join(parts)


class MsrunJob:
    """An msrun job started in the background (``start_msrun``); ``result()`` waits for it.

    A watcher thread waits for msrun, kills the job when its timeout expires (counted from
    the start) and notes when it ended, so jobs started together end on their own clock
    whatever order the tests collect them in. msrun's output goes to a file, never to a
    pipe nobody reads while another job is awaited.
    """

    def __init__(self, cmd, script, world_size, log_dir, out_dir, timeout, env):
        self.script, self.world_size, self.timeout = script, world_size, timeout
        self.log_dir, self.out_dir = log_dir, out_dir
        self.stdout_path = log_dir.parent / f"msrun_stdout_{script.stem}_{world_size}.txt"
        self.started = time.monotonic()
        with open(self.stdout_path, "w") as stdout:
            self.proc = subprocess.Popen(cmd, stdout=stdout, stderr=subprocess.STDOUT, text=True,
                                         env=env, start_new_session=True)
        self.ended_wall = None  # time.time() when msrun exited
        self.timed_out = False
        self._watcher = threading.Thread(target=self._watch, daemon=True)
        self._watcher.start()

    def _watch(self):
        try:
            self.proc.wait(timeout=self.timeout)
        except subprocess.TimeoutExpired:
            self.timed_out = True
            # msrun gives every worker a process group of its own, which killpg below would
            # miss: on SIGINT msrun SIGKILLs the workers and its scheduler itself.
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                pass
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait()
        self.ended_wall = time.time()
        self.elapsed = time.monotonic() - self.started

    def result(self) -> "MsrunResult":
        """Wait for the job. Raises AssertionError (with its output and logs) if it timed out."""
        self._watcher.join()
        stdout = self.stdout_path.read_text(errors="replace")
        result = MsrunResult(-9 if self.timed_out else self.proc.returncode, self.log_dir,
                             self.out_dir, self.elapsed, stdout, self.ended_wall)
        if self.timed_out:
            raise AssertionError(f"msrun {self.script.name} x{self.world_size} timed out after "
                                 f"{self.timeout}s\n{stdout[-4000:]}\n{result.logs()}")
        return result


def start_msrun(script, world_size: int, tmp_path: Path, *args, timeout: float = 240,
                env=None, extra_msrun_args=()) -> MsrunJob:
    """Start ``msrun`` with ``world_size`` local workers on ``script`` (a path under
    tests/workers or absolute) and return at once; ``.result()`` waits for it."""
    script = Path(script)
    if not script.is_absolute():
        script = WORKERS / script
    log_dir = tmp_path / f"msrun_log_{script.stem}_{world_size}"
    out_dir = tmp_path / f"out_{script.stem}_{world_size}"
    out_dir.mkdir(parents=True, exist_ok=True)
    cmd = ["msrun", f"--worker_num={world_size}", f"--local_worker_num={world_size}",
           f"--master_port={free_port()}", f"--log_dir={log_dir}", "--join=True",
           "--cluster_time_out=90", *extra_msrun_args, str(script), "--out", str(out_dir), *map(str, args)]
    run_env = dict(os.environ if env is None else env)
    run_env.setdefault("GLOG_v", "3")  # MindSpore: errors only
    # Each rank gets one core's worth of threads: the machine has 2 cores.
    run_env.setdefault("OMP_NUM_THREADS", "1")
    return MsrunJob(cmd, script, world_size, log_dir, out_dir, timeout, run_env)


def run_msrun(script, world_size: int, tmp_path: Path, *args, timeout: float = 240,
              env=None, extra_msrun_args=()) -> MsrunResult:
    """Run ``msrun`` with ``world_size`` local workers on ``script`` and wait for it."""
    return start_msrun(script, world_size, tmp_path, *args, timeout=timeout, env=env,
                       extra_msrun_args=extra_msrun_args).result()


@dataclass
class ScenarioJobOutcome:
    """What one job of tests/workers/sync_scenarios.py left."""
    result: Optional[MsrunResult]  # None if the job timed out
    failure: str  # the harness's timeout report, or ""
    out_dir: Optional[Path]  # the ranks' result files (those of finished scenarios after a timeout)

    def assert_finished(self, world: int) -> MsrunResult:
        """The job exited 0 and each of its ``world`` ranks finished every scenario."""
        assert self.result is not None, self.failure
        result = self.result
        assert result.returncode == 0, \
            f"msrun exited {result.returncode}\n{result.stdout[-3000:]}\n{result.logs()}"
        for rank in range(world):
            assert (result.out_dir / f"done_rank{rank}").exists(), \
                f"rank {rank} did not finish\n{result.logs()}"
        return result


def scenario_jobs(tmp_path_factory, specs, *extra_args, timeout: float):
    """name -> ScenarioJobOutcome: runs the sync_scenarios.py job ``specs[name]`` (a dict with
    world, mode and scenarios) at most once, on first use, with ``extra_args`` after the mode."""
    outcomes = {}

    def outcome(name):
        if name not in outcomes:
            spec = specs[name]
            tmp = tmp_path_factory.mktemp(name)
            try:
                result = run_msrun("sync_scenarios.py", spec["world"], tmp, "--mode", spec["mode"],
                                   *extra_args, *spec["scenarios"], timeout=timeout)
                outcomes[name] = ScenarioJobOutcome(result, "", result.out_dir)
            except AssertionError as err:  # timeout: results of finished scenarios remain
                found = sorted(tmp.glob("out_*"))
                outcomes[name] = ScenarioJobOutcome(None, str(err), found[0] if found else None)
        return outcomes[name]

    return outcome


def python() -> str:
    return sys.executable
