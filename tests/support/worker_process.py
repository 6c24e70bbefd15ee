"""A ``dataspace-worker`` command in a subprocess, its output collected line by line."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time

WORKER = shutil.which("dataspace-worker") or os.path.join(
    os.path.dirname(sys.executable), "dataspace-worker"
)


class WorkerProcess:
    """``dataspace-worker`` in a subprocess, its stderr collected line by line."""

    def __init__(self, env: dict, *args: str, wrap=None):
        """``wrap(argv)``: the command line to run instead (e.g. inside a network namespace)."""
        argv = [WORKER, *args]
        self.proc = subprocess.Popen(
            wrap(argv) if wrap else argv,
            env={**os.environ, **env},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self):
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    @property
    def output(self) -> str:
        return "\n".join(self.lines)

    def wait_for(self, text: str, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if text in self.output:
                return
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        raise AssertionError(f"worker never printed {text!r}; output:\n{self.output}")

    def terminate(self, timeout: float = 30) -> int:
        self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(timeout)
        self._reader.join(5)
        return code

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
