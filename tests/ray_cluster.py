"""TEST HELPER: a real local Ray cluster on 127.0.0.1 whose every worker process cannot
import torch, transformers or the exporter (a sitecustomize on PYTHONPATH installs the
same blocker the torch-free tests use), and the siren commands run against it."""
from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import sys
import time
from pathlib import Path

from serve_process import free_port
from helpers import BLOCKER

RAY = str(Path(sys.executable).with_name("ray"))


def blocked_env(root: Path) -> dict:
    """os.environ plus a sitecustomize that blocks torch in every Python process started."""
    site = root / "blocked-site"
    site.mkdir(parents=True, exist_ok=True)
    (site / "sitecustomize.py").write_text("import sys\n" + BLOCKER)
    token = root / "ray-auth-token"
    if not token.exists():
        token.write_text(secrets.token_hex(32))
    return {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token), "PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
            "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",      # the node advertises 127.0.0.1
            "RAY_USAGE_STATS_ENABLED": "0", "HF_HUB_OFFLINE": "1", "RAY_DEDUP_LOGS": "0"}


class LocalRay:
    """`ray start --head` on 127.0.0.1 with a private temp dir; `ray stop` on close."""

    def __init__(self, root: Path, num_cpus: int = 2):
        self.root, self.num_cpus = root, num_cpus
        self.env = blocked_env(root)
        self.port = free_port()
        self.temp = Path("/tmp") / f"ray-siren-{os.getpid()}"      # short: Ray's socket paths have a length limit

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> "LocalRay":
        subprocess.run([RAY, "start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(self.port),
                        "--num-cpus", str(self.num_cpus), "--include-dashboard", "false", "--disable-usage-stats",
                        "--temp-dir", str(self.temp)],
                       env=self.env, check=True, capture_output=True, text=True, timeout=120)
        return self

    def stop(self) -> None:
        subprocess.run([RAY, "stop", "--force"], env=self.env, capture_output=True, timeout=120)
        shutil.rmtree(self.temp, ignore_errors=True)

    def siren(self, *args, timeout: float = 300.0, check: bool = True) -> subprocess.CompletedProcess:
        proc = subprocess.run([sys.executable, "-m", "siren_cli", *map(str, args)], env=self.env,
                              capture_output=True, text=True, timeout=timeout)
        if check and proc.returncode != 0:
            raise AssertionError(f"siren {args[0]} exited {proc.returncode}:\n{proc.stderr[-4000:]}")
        return proc

    def popen(self, *args, log: Path = None) -> subprocess.Popen:
        """A siren command in the background; its output piped, or written to `log` (a
        long-running server's output would fill an unread pipe and stall it)."""
        out = open(log, "w") if log is not None else subprocess.PIPE
        try:
            return subprocess.Popen([sys.executable, "-m", "siren_cli", *map(str, args)], env=self.env,
                                    stdout=out, stderr=subprocess.STDOUT, text=True)
        finally:
            if log is not None:
                out.close()


def wait_for(predicate, timeout: float, what: str, step: float = 0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(step)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def worker_pids(name_part: str) -> list[int]:
    """Pids of Ray worker processes whose title contains `name_part` (Ray sets the title
    of an actor's worker to "ray::<ActorClass>...")."""
    out = subprocess.run(["ps", "-eo", "pid=,args="], capture_output=True, text=True).stdout
    return [int(line.split(None, 1)[0]) for line in out.splitlines()
            if name_part in line and "ray::" in line]
