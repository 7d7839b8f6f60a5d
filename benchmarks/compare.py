"""This tree against an earlier commit, in one run: the regression check to read before
resolving anything that touches the runtime.

    python benchmarks/compare.py --baseline 69a6b96 [--sizes tiny mid] [--rounds 5]
                                 [--workloads single batch stream feed_batch ...] [--workdir DIR]

What it does, so a regression cannot hide in any stage:
1. `git archive`s the baseline commit into the work dir and maps its package folders to
   their import names (as pyproject.toml's package-dir does), beside the same map of this
   tree; both sides run on this environment's third-party packages.
2. Builds one random-weight backbone and head per size (benchmarks/_models.py's dimensions),
   then exports a bundle from it with **each side's own exporter** (a regression can come
   from the exporter too).
3. Starts one worker process per side and size (benchmarks/_compare_worker.py, the same
   workloads on both) and runs the workloads in interleaved rounds: each round runs every
   workload on both sides, the side that goes first alternating, so drift of a noisy host
   lands on both.
4. Prints, per size, each workload's median seconds per side, current/baseline, the
   largest difference between the sides' checksums (they must compute the same scores), each
   side's peak RSS against its weights file, feed_batch against one-by-one feeds, the CPU's
   ISA and the load average when it started. Not a test: a table the developer reads.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
import io
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

DEFAULT_WORKLOADS = ("single", "batch", "stream", "feed_batch", "feed_one_by_one", "prefixes")


def _package_dirs(source: Path) -> dict:
    """import name -> folder, from the side's own pyproject.toml."""
    import tomllib
    project = tomllib.loads((source / "pyproject.toml").read_text())
    return project["tool"]["setuptools"]["package-dir"]


def _import_root(source: Path, root: Path) -> Path:
    """A folder whose entries are the side's packages under their import names."""
    root.mkdir(parents=True, exist_ok=True)
    for name, folder in _package_dirs(source).items():
        link = root / name
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(source / folder, target_is_directory=True)
    return root


def checkout(revision: str, workdir: Path) -> tuple[str, Path]:
    """(full commit id, folder holding that commit's tree), extracted once."""
    commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--verify", revision + "^{commit}"],
                            capture_output=True, text=True)
    if commit.returncode != 0:
        raise SystemExit(f"compare: {revision!r} is not a commit of {REPO}")
    commit = commit.stdout.strip()
    source = workdir / f"src-{commit[:12]}"
    if not (source / "pyproject.toml").is_file():
        archive = subprocess.run(["git", "-C", str(REPO), "archive", commit], capture_output=True, check=True).stdout
        with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
            tar.extractall(source, filter="data")
    return commit, source


def side_env(import_root: Path) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(import_root)
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    return env


def build_source_model(size: str, workdir: Path) -> Path:
    """The shared backbone + head (one set of weights for both sides)."""
    from _models import SIZES
    from siren_export.synthetic import make_backbone, make_head
    dims = SIZES[size]
    root = workdir / f"model-{size}"
    backbone, artifact = root / "backbone", root / "artifact"
    if not (backbone / "config.json").is_file():
        make_backbone(backbone, **dims)
    if not (artifact / "siren.safetensors").is_file():
        make_head(artifact, backbone, num_layers=dims["num_layers"], width=dims["hidden_size"],
                  selected_layers=list(range(dims["num_layers"])), neurons_per_layer=32,
                  layer_dims=(256, 64), max_length=1024, output_scale=4.0)
    return artifact


def export_with(side: str, env: dict, artifact: Path, out: Path) -> Path:
    if (out / "siren_bundle.json").is_file():
        return out
    print(f"  exporting {out.parent.name} with the {side} exporter ...", file=sys.stderr, flush=True)
    code = ("import sys\nfrom siren_export.pipeline import export_bundle\n"
            "export_bundle(sys.argv[1], sys.argv[2], overwrite=True, show_progress=False)\n")
    subprocess.run([sys.executable, "-c", code, str(artifact), str(out)], env=env, check=True,
                   cwd=tempfile.gettempdir())
    return out


class Worker:
    def __init__(self, side: str, env: dict, bundle: Path):
        self.side, self.bundle = side, bundle
        self.process = subprocess.Popen([sys.executable, str(HERE / "_compare_worker.py"), str(bundle)],
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env,
                                        cwd=tempfile.gettempdir())
        self.ready = self._read()

    def _read(self) -> dict:
        line = self.process.stdout.readline()
        if not line:
            raise SystemExit(f"compare: the {self.side} worker exited ({self.process.wait()})")
        return json.loads(line)

    def ask(self, workload: str) -> dict:
        self.process.stdin.write(json.dumps({"workload": workload}) + "\n")
        self.process.stdin.flush()
        return self._read()

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait()


def tree_digest() -> str:
    """A digest of this tree's exporter and runtime sources: the current side's bundles are
    exported again whenever either changed (committed or not)."""
    import hashlib
    digest = hashlib.sha256()
    for folder in ("export", "runtime"):
        for path in sorted((REPO / folder).rglob("*.py")):
            digest.update(str(path.relative_to(REPO)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:12]


def weights_bytes(bundle: Path) -> int:
    manifest = json.loads((bundle / "siren_bundle.json").read_text())
    data = manifest["model"].get("external_data")
    return manifest["files"][data]["bytes"] if data else 0


def isa() -> str:
    from siren_runtime.cpu_features import cpu_flags
    flags = cpu_flags()
    wanted = [f for f in ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_tile") if f in flags]
    model = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
                 "unknown CPU")
    return f"{model}, {os.cpu_count()} logical CPUs, ISA: {' '.join(wanted) or 'no AVX2'}"


def run(args) -> None:
    workdir = Path(args.workdir or Path(tempfile.gettempdir()) / "siren-compare")
    workdir.mkdir(parents=True, exist_ok=True)
    commit, base_source = checkout(args.baseline, workdir)
    head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short=12", "HEAD"], capture_output=True,
                          text=True).stdout.strip()
    dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True).stdout.strip()
    sides = {"baseline": side_env(_import_root(base_source, workdir / f"import-{commit[:12]}")),
             "current": side_env(_import_root(REPO, workdir / "import-current"))}
    load = os.getloadavg()
    print(f"# compare: current {head}{' + uncommitted changes' if dirty else ''} vs baseline {commit[:12]}")
    print(f"# {isa()}; load average at start {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    for size in args.sizes:
        artifact = build_source_model(size, workdir)
        bundles = {"baseline": export_with("baseline", sides["baseline"], artifact,
                                           workdir / f"bundle-{size}-{commit[:12]}" / "bundle"),
                   "current": export_with("current", sides["current"], artifact,
                                          workdir / f"bundle-{size}-current-{tree_digest()}" / "bundle")}
        workers = {side: Worker(side, sides[side], bundles[side]) for side in ("baseline", "current")}
        for side, worker in workers.items():
            print(f"  {side}: siren_runtime from {worker.ready['runtime']}", file=sys.stderr, flush=True)
        times = {side: {w: [] for w in args.workloads} for side in workers}
        values, skipped = {side: {} for side in workers}, {}
        try:
            for r in range(args.rounds):
                order = ("baseline", "current") if r % 2 == 0 else ("current", "baseline")
                for workload in args.workloads:
                    for side in order:
                        answer = workers[side].ask(workload)
                        if "skip" in answer:
                            skipped[(side, workload)] = answer["skip"]
                            continue
                        times[side][workload].append(answer["seconds"])
                        values[side][workload] = answer["value"]
                print(f"  {size}: round {r + 1}/{args.rounds} done", file=sys.stderr, flush=True)
            peaks = {side: worker.ask("rss")["rss_mib"] for side, worker in workers.items()}
        finally:
            for worker in workers.values():
                worker.close()
        report(size, args, times, values, skipped, peaks, bundles)


def report(size, args, times, values, skipped, peaks, bundles) -> None:
    print(f"\n## {size} dims, {args.rounds} interleaved rounds (median seconds)\n")
    print("| workload | baseline | current | current / baseline | checksum Δ |")
    print("|---|---:|---:|---:|---:|")
    for workload in args.workloads:
        base, cur = times["baseline"][workload], times["current"][workload]
        if not base or not cur:
            why = skipped.get(("baseline", workload)) or skipped.get(("current", workload))
            cells = [f"{statistics.median(t):.3f}" if t else "n/a" for t in (base, cur)]
            print(f"| {workload} | {cells[0]} | {cells[1]} | - | ({why}) |")
            continue
        b, c = statistics.median(base), statistics.median(cur)
        delta = abs(values["baseline"][workload] - values["current"][workload])
        print(f"| {workload} | {b:.3f} | {c:.3f} | **{c / b:.2f}** | {delta:.1e} |")
    print()
    for side in ("baseline", "current"):
        weights = weights_bytes(bundles[side]) / 2**20
        together, alone = times[side].get("feed_batch"), times[side].get("feed_one_by_one")
        speedup = (f"; feed_batch {statistics.median(alone) / statistics.median(together):.2f}x one-by-one"
                   if together and alone else "")
        print(f"- {side}: peak RSS {peaks[side]:.0f} MiB = {peaks[side] / weights:.2f}x its weights file "
              f"({weights:.0f} MiB){speedup}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline", required=True, help="the commit to compare against (any git revision)")
    parser.add_argument("--sizes", nargs="+", default=["tiny", "mid"], help="model dimensions (benchmarks/_models.py)")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds (default 5)")
    parser.add_argument("--workloads", nargs="+", default=list(DEFAULT_WORKLOADS), choices=DEFAULT_WORKLOADS)
    parser.add_argument("--workdir", help="where checkouts, models and bundles are kept (default: $TMPDIR/siren-compare)")
    run(parser.parse_args())


if __name__ == "__main__":
    main()
