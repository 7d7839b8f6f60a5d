"""TEST HELPER: `siren serve` in a child process where torch and transformers cannot be
imported, on a free loopback port; stopped with SIGTERM (the graceful path)."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

from helpers import BLOCKER

SCRIPT = BLOCKER + "from siren_cli.main import main\nsys.exit(main(sys.argv[1:]))\n"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServeProcess:
    def __init__(self, bundle, *options, env=None):
        self.port = free_port()
        self.args = ["serve", str(bundle), "--port", str(self.port), *options]
        self.env = {**os.environ, **(env or {})}
        self.process = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 120.0) -> "ServeProcess":
        import httpx
        self.process = subprocess.Popen([sys.executable, "-c", SCRIPT, *self.args], stdout=subprocess.PIPE,
                                        stderr=subprocess.STDOUT, text=True, env=self.env)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"siren serve exited ({self.process.returncode}):\n{self.process.stdout.read()}")
            try:
                if httpx.get(self.url + "/health", timeout=1.0).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError("siren serve did not become healthy")

    def stop(self, timeout: float = 60.0) -> tuple[int, str]:
        if self.process is None:
            return 0, ""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        output = self.process.stdout.read()
        return self.process.returncode, output

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
