"""The Gradio demo as a real server process, for tests and benchmarks that need its log.

`GradioServer` runs `python -m toast_core.frontends.gradio_app` in its own process group on a free loopback
port, with stdout and stderr in a log file (so a test can assert that no traceback was printed), and
stops only that group. The Streamlit counterpart is `benchmarks.app_latency.LabServer`.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from benchmarks.app_latency import free_port

ROOT = Path(__file__).resolve().parent.parent


class GradioServer:
    """`python -m toast_core.frontends.gradio_app` on 127.0.0.1, its output in `log_path`."""

    def __init__(self, runs_dir: Path, backbone: str = "fixture", log: Path | None = None, threads: int = 1):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/"
        self.runs_dir, self.backbone, self.threads = Path(runs_dir), backbone, threads
        self.log_path = log or Path(tempfile.mkstemp(prefix="gradio-", suffix=".log")[1])
        self.proc: subprocess.Popen | None = None

    def start(self) -> GradioServer:
        tmp = Path(tempfile.mkdtemp(prefix="gradio-tmp-"))
        env = dict(os.environ, GRADIO_ANALYTICS_ENABLED="False", GRADIO_TEMP_DIR=str(tmp),
                   OMP_NUM_THREADS=str(self.threads), PYTHONPATH=str(ROOT))
        cmd = [sys.executable, "-m", "toast_core.frontends.gradio_app", "--backbone", self.backbone, "--port", str(self.port),
               "--host", "127.0.0.1", "--runs-dir", str(self.runs_dir), "--threads", str(self.threads)]
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=self._log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        return self

    def wait_ready(self, timeout: float = 300.0, attempts: int = 3) -> float:
        """Seconds until the page answers. Gradio gives its server thread 5 s to come up, which a
        loaded machine can miss; then the process exits and is started again on a fresh port."""
        start = time.monotonic()
        while time.monotonic() - start < timeout:
            if self.proc is not None and self.proc.poll() is not None:
                attempts -= 1
                if attempts <= 0 or "Server failed to start" not in self.log() and "empty port" not in self.log():
                    raise RuntimeError(f"the Gradio demo exited with {self.proc.returncode}:\n{self.log()}")
                self._log.close()
                self.port = free_port()
                self.url = f"http://127.0.0.1:{self.port}/"
                self.start()
                continue
            try:
                with urllib.request.urlopen(self.url, timeout=5) as r:
                    if r.status == 200:
                        return time.monotonic() - start
            except OSError:
                time.sleep(0.3)
        raise TimeoutError(f"the Gradio demo did not answer within {timeout} s:\n{self.log()}")

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)  # the group this server leads, nothing else
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=15)
        self._log.close()

    def __enter__(self) -> GradioServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
