"""What a bundle on disk can and cannot make the runtime do (adversarial probes of issues 21
and 38): contents that match their checksums but are not what the manifest says, graph weights
the manifest does not name (never hashed) or files it does not list, are bundle errors naming
them; an export killed mid-write, a publish racing a folder that appeared, and a killed run's
staging folder never leave or load a half-written bundle."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import copy_bundle, edit_manifest


def _rehashed_copy(src: Path, dst: Path, mutate) -> Path:
    import hashlib
    from siren_runtime.bundle import MANIFEST_NAME, write_manifest
    shutil.copytree(src, dst)
    for p in dst.iterdir():
        os.chmod(p, 0o644)
    manifest = json.loads((dst / MANIFEST_NAME).read_text())
    mutate(dst, manifest)
    manifest["files"] = {name: {"sha256": hashlib.sha256((dst / name).read_bytes()).hexdigest(),
                                "bytes": (dst / name).stat().st_size} for name in manifest["files"]}
    write_manifest(dst, manifest)
    return dst


def test_bad_contents_with_matching_checksums_are_bundle_errors(all_layers, tmp_path):
    from siren_runtime import BundleError, SirenGuard

    def garbage(name):
        return lambda d, m: (d / name).write_bytes(os.urandom(4096))

    def truncated(name):
        return lambda d, m: (d / name).write_bytes((d / name).read_bytes()[:2048])

    def renamed_tokenizer(d, m):
        m["tokenizer"]["path"] = "./tokenizer.json"
        m["files"]["./tokenizer.json"] = m["files"].pop("tokenizer.json")
    cases = {"tokenizer-garbage": (garbage("tokenizer.json"), "tokenizer"),
             "model-garbage": (garbage("model.onnx"), "model.onnx"),
             "model-truncated": (truncated("model.onnx"), "model.onnx"),
             "data-truncated": (truncated("model.onnx.data"), "model.onnx"),
             "step-garbage": (garbage("step.onnx"), "step.onnx"),
             "dot-slash-path": (renamed_tokenizer, "plain form")}
    for name, (mutate, says) in cases.items():
        bundle = _rehashed_copy(all_layers.bundle, tmp_path / name, mutate)
        # a CPU guard with a step graph runs on it alone; the scoring graph is read without one
        alone = {"incremental_streaming": False} if name.startswith("model-") else {}
        with pytest.raises(BundleError, match=says):
            SirenGuard.from_pretrained(bundle, device="cpu", **alone)


def _terminate_when(process: subprocess.Popen, ready, timeout: float = 300.0) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "the command never reached the point to interrupt"
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)


def test_sigterm_mid_write_leaves_nothing_behind(all_layers, tmp_path):
    """quantize and export build in a hidden staging folder; SIGTERM removes it as ^C does
    (and a staging manifest never carries the source's parity verdict)."""
    script = "import sys\nfrom siren_cli.main import main\nsys.exit(main(sys.argv[1:]))\n"
    out = tmp_path / "int8"
    process = subprocess.Popen([sys.executable, "-c", script, "quantize", str(all_layers.bundle), "-o", str(out),
                                "-q"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def staged_manifest():
        for staging in tmp_path.glob(".int8.partial-*"):
            manifest = staging / "siren_bundle.json"
            if manifest.exists():
                try:
                    parity = json.loads(manifest.read_text()).get("parity", {})
                except ValueError:
                    return False
                assert parity.get("passed") is not True, parity
                return True
        return False
    _terminate_when(process, staged_manifest)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 143, err
    assert not out.exists() and not list(tmp_path.glob(".int8.partial-*")), list(tmp_path.iterdir())

    out = tmp_path / "exported"
    process = subprocess.Popen([sys.executable, "-c", script, "export", str(all_layers.artifact), "-o", str(out),
                                "-q"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _terminate_when(process, lambda: any((s / "model.onnx").exists() for s in tmp_path.glob(".exported.partial-*")))
    _, err = process.communicate(timeout=120)
    assert process.returncode == 143, err
    assert not out.exists() and not list(tmp_path.glob(".exported.partial-*")), list(tmp_path.iterdir())


# -- 1 and 6: every file a graph reads is one the manifest names and hashes ----------------
@pytest.mark.parametrize("section, how", [("model", "null"), ("model", "removed"), ("streaming", "null")])
def test_graph_weights_the_manifest_does_not_name_are_refused(all_layers, tmp_path, monkeypatch, section, how):
    from siren_runtime import BundleError, SirenGuard
    bundle = copy_bundle(all_layers.bundle, tmp_path)
    def edit(manifest):
        if how == "null":
            manifest[section]["external_data"] = None
        else:
            manifest[section].pop("external_data")
        manifest[section].pop("weights", None)     # (old step graphs named no file, only shared bytes)
    edit_manifest(bundle, edit)
    # a weights file in the working directory must never be picked up either
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    (elsewhere / "model.onnx.data").write_bytes((bundle / "model.onnx.data").read_bytes())
    monkeypatch.chdir(elsewhere)
    graph = "model.onnx" if section == "model" else "step.onnx"
    with pytest.raises(BundleError, match=rf"{graph} reads its weights from 'model.onnx.data'.*{section}.external_data"):
        # the scoring graph runs alone without incremental streaming (a CPU guard scores on the step graph)
        SirenGuard.from_pretrained(bundle, device="cpu", incremental_streaming=section == "streaming")


def test_graph_naming_an_unlisted_file_is_a_bundle_error_naming_it(all_layers, tmp_path):
    import onnx
    from siren_runtime import BundleError, SirenGuard
    from siren_runtime.bundle import describe_file
    bundle = copy_bundle(all_layers.bundle, tmp_path)
    model = onnx.load(str(bundle / "model.onnx"), load_external_data=False)
    for tensor in model.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = "secret.bin"
    (bundle / "model.onnx").write_bytes(model.SerializeToString())
    shutil.copy(bundle / "model.onnx.data", bundle / "secret.bin")
    edit_manifest(bundle, lambda m: m["files"].__setitem__("model.onnx", describe_file(bundle, "model.onnx")))
    with pytest.raises(BundleError, match=r"reads weights from 'secret.bin', which the manifest does not name"):
        SirenGuard.from_pretrained(bundle, device="cpu", incremental_streaming=False)


def test_graph_reference_reader_sees_every_external_tensor(all_layers):
    import onnx
    from siren_runtime.graph_refs import external_files
    graph = (all_layers.bundle / "model.onnx").read_bytes()
    model = onnx.load_from_string(graph)
    want = sorted(t.name for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL)
    got = external_files(graph)
    assert want and sorted(name for name, _ in got) == want
    assert {location for _, location in got} == {"model.onnx.data"}
    with pytest.raises(ValueError, match="not a well-formed ONNX model"):
        external_files(graph[:-7] + b"\xff" * 7)


# -- 3 and 9: publishing never replaces what it did not create; stale staging is cleared --
def test_publish_never_replaces_a_folder_that_appeared(tmp_path):
    from siren_runtime.bundle import Staging
    output = tmp_path / "out"
    first, second = Staging(output), Staging(output)
    (first.path / "which").write_text("first")
    (second.path / "which").write_text("second")
    first.publish()
    with pytest.raises(FileExistsError, match="appeared while this run was writing"):
        second.publish()
    assert (output / "which").read_text() == "first"
    assert not second.path.exists()
    # an empty folder that appears is not replaced either
    empty = tmp_path / "empty"
    stage = Staging(empty)
    empty.mkdir()
    with pytest.raises(FileExistsError):
        stage.publish()
    assert empty.is_dir() and not any(empty.iterdir())
    # told to overwrite: replaced
    third = Staging(output)
    (third.path / "which").write_text("third")
    third.publish(overwrite=True)
    assert (output / "which").read_text() == "third"


def test_a_killed_runs_staging_folder_never_loads_and_is_removed_next_time(all_layers, tmp_path):
    from siren_runtime import BundleError, SirenGuard
    from siren_runtime.bundle import Staging, read_bundle
    output = tmp_path / "out"
    # a run that wrote a whole bundle into its staging folder and was killed (SIGKILL) before publishing
    script = ("import os, shutil, signal, sys\nfrom siren_runtime.bundle import Staging\n"
              f"s = Staging({str(output)!r})\nshutil.copytree({str(all_layers.bundle)!r}, s.path, dirs_exist_ok=True)\n"
              "print(s.path, flush=True)\nos.kill(os.getpid(), signal.SIGKILL)\n")
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert run.returncode == -signal.SIGKILL
    partial = Path(run.stdout.strip())
    assert partial.is_dir() and (partial / "siren_bundle.json").is_file()
    with pytest.raises(BundleError, match="unfinished bundle left by an interrupted"):
        read_bundle(partial)
    with pytest.raises(BundleError, match="unfinished bundle"):
        SirenGuard.from_pretrained(partial, device="cpu")
    # a live run's own staging folder still reads (the exporter checks what it wrote)
    live = Staging(output)
    assert not partial.exists()                     # the next run for this output removed it
    shutil.copytree(all_layers.bundle, live.path, dirs_exist_ok=True)
    read_bundle(live.path).verify()
    live.discard()
    assert not live.path.exists()
