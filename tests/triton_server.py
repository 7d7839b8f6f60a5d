"""Start and stop a real tritonserver (from the nvidia-pytriton wheel) for tests and benchmarks.

`make test` unpacks the wheel into .cache/tritonserver (SIREN_TRITON_HOME overrides) and
makes `venv/` there: the Python environment the models run in, found through PATH as on a
real server. It holds siren-deploy's runtime with numpy<2: the stub's C++ side was built
against NumPy 1.x, and with NumPy 2 every string tensor arrives garbled.
"""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


def triton_home() -> Path:
    return Path(os.environ.get("SIREN_TRITON_HOME", REPO_ROOT / ".cache" / "tritonserver"))


def server_binary() -> Path:
    return triton_home() / "pytriton" / "tritonserver" / "bin" / "tritonserver"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class TritonServer:
    def __init__(self, repository: Path, startup_timeout: float = 180.0):
        self.repository = Path(repository)
        self.startup_timeout = startup_timeout
        self.http_port, self.grpc_port, self.metrics_port = _free_port(), _free_port(), _free_port()
        self.process = None
        self._workdir = None

    @property
    def http_url(self) -> str:
        return f"127.0.0.1:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def _prepare(self) -> dict:
        home = triton_home() / "pytriton" / "tritonserver"
        self._workdir = Path(tempfile.mkdtemp(prefix="siren-triton-"))
        backends = self._workdir / "backends"
        shutil.copytree(home / "backends", backends)
        version = f"{sys.version_info.major}.{sys.version_info.minor}"
        stub = home / "python_backend_stubs" / version / "triton_python_backend_stub"
        shutil.copy2(stub, backends / "python" / "triton_python_backend_stub")
        os.chmod(backends / "python" / "triton_python_backend_stub", 0o755)
        env = dict(os.environ)
        libs = [str(triton_home() / "nvidia_pytriton.libs"), str(home / "external_libs")]
        env["LD_LIBRARY_PATH"] = os.pathsep.join(libs + [env.get("LD_LIBRARY_PATH", "")])
        env.pop("PYTHONPATH", None)
        env.pop("VIRTUAL_ENV", None)
        env["PATH"] = str(triton_home() / "venv" / "bin") + os.pathsep + env.get("PATH", "")
        return env

    def start(self) -> "TritonServer":
        import tritonclient.http as httpclient
        env = self._prepare()
        self.log_path = self._workdir / "server.log"
        log = open(self.log_path, "w")
        self.process = subprocess.Popen(
            [str(server_binary()), f"--model-repository={self.repository}",
             f"--backend-directory={self._workdir / 'backends'}",
             f"--http-port={self.http_port}", f"--grpc-port={self.grpc_port}",
             f"--metrics-port={self.metrics_port}", "--http-address=127.0.0.1", "--grpc-address=127.0.0.1",
             "--allow-metrics=false", "--exit-on-error=true", "--log-verbose=0"],
            stdout=log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + self.startup_timeout
        client = httpclient.InferenceServerClient(self.http_url)
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"tritonserver exited ({self.process.returncode}):\n{self.log_tail()}")
            try:
                if client.is_server_ready():
                    return self
            except Exception:
                pass
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"tritonserver not ready after {self.startup_timeout}s:\n{self.log_tail()}")

    def log_tail(self, chars: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self._workdir is not None:
            shutil.rmtree(self._workdir, ignore_errors=True)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
