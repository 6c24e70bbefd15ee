"""Reading what a command wrote to a pseudo-terminal."""

from __future__ import annotations

import os
import select
import subprocess


def read_terminal(master: int, process: subprocess.Popen) -> str:
    """Everything written to the pseudo-terminal ``master`` until ``process`` ends."""
    text = b""
    while True:
        ready, _, _ = select.select([master], [], [], 0.5)
        if ready:
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: the last writer closed it
                break
            if not chunk:
                break
            text += chunk
        elif process.poll() is not None:
            break
    return text.decode("utf-8", "replace")
