"""Launch a worker script on several ranks with msrun, from pytest.

Every job gets a free port, its own log directory and a hard timeout after
which the whole process group is killed, so no test can hang the suite.
Workers write their results to ``out_dir`` (one file per rank); the test then
checks them against tests/reference.py.
"""
import os
import signal
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

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

    def logs(self) -> str:
        """All worker and scheduler logs, for failure messages."""
        parts = []
        for path in sorted(self.log_dir.glob("*.log")):
            parts.append(f"===== {path.name}\n{path.read_text(errors='replace')[-6000:]}")
        return "\n".join(parts)


def run_msrun(script, world_size: int, tmp_path: Path, *args, timeout: float = 240,
              env=None, extra_msrun_args=()) -> MsrunResult:
    """Run ``msrun`` with ``world_size`` local workers on ``script`` (a path under tests/workers or absolute)."""
    import time

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
    start = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=run_env, start_new_session=True)
    try:
        stdout, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        # msrun gives every worker a process group of its own, which killpg below would
        # miss: on SIGINT msrun SIGKILLs the workers and its scheduler itself.
        proc.send_signal(signal.SIGINT)
        try:
            stdout, _ = proc.communicate(timeout=15)
        except subprocess.TimeoutExpired:
            stdout = None
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        if stdout is None:
            stdout, _ = proc.communicate()
        result = MsrunResult(-9, log_dir, out_dir, time.monotonic() - start, stdout)
        raise AssertionError(f"msrun {script.name} x{world_size} timed out after {timeout}s\n"
                             f"{stdout[-4000:]}\n{result.logs()}")
    return MsrunResult(proc.returncode, log_dir, out_dir, time.monotonic() - start, stdout)


def python() -> str:
    return sys.executable
