"""Start the service (or a worker) as a real OS process, the way `make run` / `python worker.py` do."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class ServiceProcess:
    """``uvicorn main:create_app --factory`` on a loopback port, with the given environment."""

    def __init__(self, env: Mapping[str, str], *, log_path: Path, port: int | None = None) -> None:
        self.port = port or free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.env = {
            **{k: v for k, v in os.environ.items() if not k.startswith(("SUPABASE_", "REVE_", "NANOBANA_"))},
            "PUBLIC_BASE_URL": self.base_url,
            **env,
        }
        self.log_path = log_path
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, timeout_s: float = 60.0) -> ServiceProcess:
        command = [sys.executable, "-m", "uvicorn", "main:create_app", "--factory", "--host", "127.0.0.1",
                   "--port", str(self.port)]
        self.process = self._spawn(command)
        self.wait_healthy(timeout_s)
        return self

    def _spawn(self, command: list[str]) -> subprocess.Popen[bytes]:
        with self.log_path.open("ab") as log:  # the child keeps its own copy of the descriptor
            return subprocess.Popen(command, cwd=REPO, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=True)

    def wait_healthy(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            assert self.process is not None
            if self.process.poll() is not None:
                raise RuntimeError(f"the service exited with {self.process.returncode}:\n{self.logs()[-4000:]}")
            try:
                if httpx.get(f"{self.base_url}/health", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        raise TimeoutError(f"the service did not become healthy in {timeout_s} s:\n{self.logs()[-4000:]}")

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def signal(self, sig: int) -> None:
        if self.process and self.process.poll() is None:
            os.killpg(self.process.pid, sig)

    def stop(self, timeout_s: float = 30.0) -> int | None:
        """SIGTERM, then SIGKILL if it does not stop in time. Returns the exit code; a clean shutdown is 0, or
        -SIGTERM from uvicorn, which re-raises the signal it handled once it has shut down (see `stopped_cleanly`)."""
        if self.process is None:
            return None
        self.signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.signal(signal.SIGKILL)
            return self.process.wait(timeout=10)


def stopped_cleanly(code: int | None) -> bool:
    return code in (0, -signal.SIGTERM)


class WorkerProcess(ServiceProcess):
    """``python worker.py`` with the given environment."""

    def start(self, timeout_s: float = 60.0) -> WorkerProcess:
        self.process = self._spawn([sys.executable, "worker.py"])
        deadline = time.monotonic() + timeout_s
        while "worker_started" not in self.logs():
            if self.process.poll() is not None:
                raise RuntimeError(f"the worker exited with {self.process.returncode}:\n{self.logs()[-4000:]}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"the worker did not start:\n{self.logs()[-4000:]}")
            time.sleep(0.1)
        return self
