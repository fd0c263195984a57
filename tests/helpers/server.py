"""A real ``slm-serve`` process for the tests: on 127.0.0.1, a free port (``--port 0``: the
server prints the one it bound), stopped by SIGTERM when done."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


@dataclass
class Server:
    proc: subprocess.Popen
    url: str = ""
    log: list[str] = field(default_factory=list)

    def rss_mb(self) -> float:
        with open(f"/proc/{self.proc.pid}/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024

    def stop(self, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=timeout)


def _read(server: Server, ready: threading.Event) -> None:
    for line in server.proc.stderr:
        server.log.append(line.rstrip())
        m = re.search(r"listening on (http://127\.0\.0\.1:\d+)", line)
        if m:
            server.url = m.group(1)
            ready.set()
    ready.set()


@contextlib.contextmanager
def serving(model, *args: str, startup_s: float = 240):
    """``slm-serve --model MODEL ARGS`` on a free loopback port -> a ``Server``."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "slm_export.serve", "--model", str(model),
                             "--host", "127.0.0.1", "--port", "0", *args], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    server, ready = Server(proc), threading.Event()
    threading.Thread(target=_read, args=(server, ready), daemon=True).start()
    deadline = time.monotonic() + startup_s
    while not ready.wait(0.2) and time.monotonic() < deadline:
        pass
    if not server.url:
        proc.kill()
        raise RuntimeError("slm-serve did not start:\n" + "\n".join(server.log[-30:]))
    try:
        yield server
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
