"""`make demo` and the README, as a newcomer meets them: the demo runs offline into ./demo,
a second run reuses that folder, the command it prints works in a new shell, and every
command in the README (but those marked as needing the network, a GPU or Docker) runs."""
from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
#: what a README line says when a test cannot run it here
NEEDS = re.compile(r"#\s*needs:\s*(network|GPU|Docker)", re.IGNORECASE)


@pytest.fixture(scope="module")
def checkout(tmp_path_factory) -> "Checkout":
    """A working directory laid out like the checkout after `make demo`: .venv (this
    interpreter's environment) and ./demo, made by the demo as the Makefile runs it."""
    root = tmp_path_factory.mktemp("checkout")
    (root / ".venv").symlink_to(Path(sys.prefix))
    proc = subprocess.run([".venv/bin/siren", "demo", "--workdir", "demo"], cwd=root, capture_output=True,
                          text=True, timeout=900, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return Checkout(root, proc)


class Checkout(type(Path())):
    """The folder, and what the demo's first run printed."""

    def __new__(cls, root, first_run):
        made = super().__new__(cls, root)
        made.first_run = first_run
        return made


def test_demo_runs_offline(checkout):
    proc = checkout.first_run
    assert "RANDOM-WEIGHT DEMO MODEL" in proc.stdout and "torch loaded: False" in proc.stdout
    rows = [l for l in proc.stdout.splitlines() if l.strip() and l.strip()[0].isdigit() and "." in l.split()[0]]
    assert len(rows) == 5 and all(0.0 <= float(r.split()[0]) <= 1.0 for r in rows)
    assert (checkout / "demo" / "bundle" / "siren_bundle.json").is_file()
    assert "Warning" not in proc.stderr, proc.stderr       # torch's FutureWarning came twice


def test_demo_twice_leaves_one_folder_and_its_command_works_in_a_new_shell(checkout):
    before = sorted(p.name for p in checkout.iterdir())
    again = subprocess.run([".venv/bin/siren", "demo", "--workdir", "demo"], cwd=checkout, capture_output=True,
                           text=True, timeout=900)
    assert again.returncode == 0 and "reusing the bundle" in again.stdout
    assert sorted(p.name for p in checkout.iterdir()) == before == [".venv", "demo"]
    last = again.stdout.strip().splitlines()[-1]
    assert last == checkout.first_run.stdout.strip().splitlines()[-1]
    command = last.split(": ", 1)[1]
    assert command == '.venv/bin/siren score demo/bundle "your text"'
    fresh = subprocess.run(["env", "-i", f"PATH={os.defpath}", "HOME=" + str(checkout), "bash", "-c", command],
                           cwd=checkout, capture_output=True, text=True, timeout=300)
    assert fresh.returncode == 0, fresh.stderr
    assert fresh.stdout.rstrip("\n").endswith("\t-\tyour text")


def readme_blocks(language: str) -> list[str]:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    return re.findall(rf"```{language}\n(.*?)```", text, flags=re.DOTALL)


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_every_readme_command_runs(checkout):
    makefile = (ROOT / "Makefile").read_text()
    port = str(_free_port())
    background, ran = [], []
    try:
        for block in readme_blocks("bash"):
            for line in block.strip().splitlines():
                line = line.strip()
                if not line or line.startswith("#") or NEEDS.search(line):
                    continue
                if line.startswith("make "):        # what CI runs (.ci/run) and the demo fixture did
                    assert re.search(rf"^{line.split()[1]}:", makefile, flags=re.M), line
                    continue
                line = line.replace("8000", port)
                if line.endswith("&"):
                    background.append(subprocess.Popen(["bash", "-c", line[:-1]], cwd=checkout,
                                                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))
                    _wait_for(port, background[-1])
                    continue
                proc = subprocess.run(["bash", "-c", line], cwd=checkout, capture_output=True, text=True,
                                      timeout=300)
                assert proc.returncode == 0 and proc.stdout.strip(), (line, proc.stderr[-2000:])
                ran.append(line)
        for block in readme_blocks("python"):
            code = block.replace("localhost:8000", f"localhost:{port}")
            proc = subprocess.run([sys.executable, "-c", code], cwd=checkout, capture_output=True, text=True,
                                  timeout=300)
            assert proc.returncode == 0 and proc.stdout.strip(), (code, proc.stderr[-2000:])
            ran.append("python block")
    finally:
        for process in background:
            process.terminate()
            process.wait(timeout=60)
    assert len(ran) >= 9, ran


def _wait_for(port: str, process, timeout: float = 120.0) -> None:
    import httpx
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, process.stderr.read()
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1.0).status_code == 200:
                return
        except httpx.HTTPError:
            time.sleep(0.2)
    raise AssertionError(f"the server did not answer on port {port}")
