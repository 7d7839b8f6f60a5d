"""`siren score-corpus`: a whole corpus scored on Ray Data, each row exactly once.

The driver plans shards (corpus_io), skips those whose part already exists, and streams
the rest through ``map_batches`` over an actor pool: each actor holds one guard (a
``SirenScorer``) and turns a shard into its part (read, score, atomic write). Ray Data
restarts an actor that dies and retries its shard; the part's rename makes a retry
replace, never duplicate. When every part is in place the driver counts their rows
against the plan and writes ``_SUCCESS``. A rerun with the same output and settings
finishes an interrupted run; other settings are refused rather than mixed.
"""
from __future__ import annotations

import hashlib
import json
import logging
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, TextIO

from siren_runtime.validation import check_int

from .corpus_io import (Shard, clear_temporaries, file_fingerprint, input_files, output_id, part_rows,
                        plan_shards, read_shard, write_part)

RUN_FILE = "_siren_run.json"
SUCCESS_FILE = "_SUCCESS"


@dataclass
class CorpusOptions:
    bundle: str
    inputs: list
    out_dir: str
    fmt: str = "parquet"
    address: Optional[str] = None              # an existing cluster ("auto", "ray://...", "host:port")
    actors: int = 1
    cpus_per_actor: Optional[float] = None     # default: every CPU of a local cluster, else 1
    gpus_per_actor: float = 0.0
    rows_per_shard: int = 2000
    batch_size: Optional[int] = None           # records per score_batch call (None: the whole shard)
    threshold: Optional[float] = None
    onset: bool = False
    sustain: int = 1
    errors: str = "fail"
    overwrite: bool = False
    device: Optional[str] = None
    backend: Optional[str] = None
    verify: bool = True
    guard_options: dict = field(default_factory=dict)

    def check(self) -> None:
        if self.fmt not in ("parquet", "jsonl"):
            raise ValueError(f"--format must be parquet or jsonl, got {self.fmt!r}")
        if self.errors not in ("fail", "skip"):
            raise ValueError(f"--errors must be fail or skip, got {self.errors!r}")
        for name in ("actors", "rows_per_shard", "batch_size", "sustain"):
            value = getattr(self, name)
            check_int(value, f"--{name.replace('_', '-')}", optional=name == "batch_size")
        for name in ("cpus_per_actor", "gpus_per_actor"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, (int, float)) and 0 <= value <= 1024):
                raise ValueError(f"--{name.replace('_', '-')} must be a number in [0, 1024], got {value!r}")
        if not self.inputs:
            raise ValueError("name at least one input file or folder")
        if self.threshold is not None:
            from siren_runtime.validation import check_threshold
            check_threshold(self.threshold, 0.5)
        self._check_bundle()

    def _check_bundle(self) -> None:
        """A local bundle is read here, before Ray starts: a wrong path, or --onset on a bundle
        without prefix scores, is one line rather than every actor's traceback."""
        from siren_runtime.bundle import read_bundle
        from siren_runtime.hub import is_repo_id
        if not Path(self.bundle).exists() and is_repo_id(self.bundle):
            return          # a Hub bundle: each node fetches it (and says so if it cannot)
        bundle = read_bundle(self.bundle)
        if self.onset and bundle.guard.kind == "trajectory":
            raise ValueError("--onset is a content guard's (where harm starts in a text); this bundle is a "
                             "trajectory guard, which scores whole agent runs")
        if self.onset and (bundle.prefix_head is None or bundle.streaming is None):
            raise ValueError("--onset needs a bundle with a streaming step graph and a prefix head "
                             "(re-export it with `siren export`)")

    def settings(self, files: list[Path]) -> dict:
        """What a rerun must match to continue this run's output."""
        return {"bundle": self.bundle, "inputs": [file_fingerprint(p) for p in files], "format": self.fmt,
                "rows_per_shard": self.rows_per_shard, "threshold": self.threshold, "onset": self.onset,
                "sustain": self.sustain, "errors": self.errors}


class ShardStage:
    """The model stage, one per actor: a shard descriptor in, its part on disk, a summary out.
    Configured by subclassing (`configured`), not constructor arguments: Ray keeps those in
    the object store, where a restarted actor may not find them again."""
    config: dict = {}

    @classmethod
    def configured(cls, **config) -> type:
        return type(cls.__name__, (cls,), {"config": config})

    def __init__(self):
        from .scorer import SirenScorer
        c = self.config
        self.scorer = SirenScorer(c["bundle"], **c["scorer_options"])
        self.out_dir, self.fmt, self.errors, self.batch_size = Path(c["out_dir"]), c["fmt"], c["errors"], c["batch_size"]

    def __call__(self, batch: dict) -> dict:
        summaries = [self.run(Shard(**{k: _plain(v[i]) for k, v in batch.items() if k != "key_"}))
                     for i in range(len(batch["key_"]))]
        return {k: [s[k] for s in summaries] for k in ("key_", "rows", "flagged", "skipped", "error")}

    def run(self, shard: Shard) -> dict:
        from siren_runtime.records import InputError, check_kinds
        summary = {"key_": shard.key, "rows": 0, "flagged": 0, "skipped": json.dumps([]), "error": ""}
        try:
            records, skipped = read_shard(shard, self.errors)
            check_kinds(records, self.scorer.kind, "row")
        except InputError as e:
            summary["error"] = str(e)
            return summary
        columns = {"id": [output_id(r, shard) for r in records], "score": [], "flagged": []}
        if self.scorer.onset:
            columns["onset"] = []
        step = self.batch_size or max(1, len(records))     # one call: sorted by length across the shard
        for start in range(0, len(records), step):
            group = records[start:start + step]
            thresholds = [r.threshold if r.threshold is not None else self.scorer.threshold for r in group]
            added = self.scorer.score_texts([r.scored for r in group], thresholds)
            columns["score"].extend(float(s) for s in added["score"])
            columns["flagged"].extend(bool(f) for f in added["flagged"])
            if self.scorer.onset:
                columns["onset"].extend(None if int(o) < 0 else int(o) for o in added["onset"])
        write_part(self.out_dir, shard.part_name(self.fmt), columns, self.fmt)
        summary.update(rows=len(records), flagged=sum(columns["flagged"]), skipped=json.dumps(skipped))
        return summary


def _plain(value):
    """numpy scalars from a Ray Data batch -> Python values."""
    return value.item() if hasattr(value, "item") else value


def _bundle_fingerprint(bundle: str) -> str:
    """The bundle manifest's hash (it names every file's sha256): a rerun with other weights
    is another run. A Hub id is taken as given (its revision pins it)."""
    from siren_runtime.bundle import MANIFEST_NAME
    manifest = Path(bundle) / MANIFEST_NAME
    return hashlib.sha256(manifest.read_bytes()).hexdigest() if manifest.is_file() else bundle


class Progress:
    """rows/s and ETA on stderr, at most every `every_s` seconds and at the end."""

    def __init__(self, total: int, done: int, out: TextIO, every_s: float = 2.0):
        self.total, self.done, self.out, self.every_s = total, done, out, every_s
        self.started, self.last, self.rows_now = time.monotonic(), 0.0, 0

    def add(self, rows: int, final: bool = False) -> None:
        self.done += rows
        self.rows_now += rows
        now = time.monotonic()
        if not final and now - self.last < self.every_s:
            return
        self.last = now
        rate = self.rows_now / max(now - self.started, 1e-9)
        left = self.total - self.done
        eta = f"{left / rate:,.0f} s" if rate > 0 and left > 0 else "-"
        share = 100.0 * self.done / self.total if self.total else 100.0
        print(f"siren score-corpus: {self.done:,}/{self.total:,} rows ({share:.0f}%), {rate:,.0f} rows/s, ETA {eta}",
              file=self.out, flush=True)


def prepare_output(options: CorpusOptions, files: list[Path]) -> Path:
    """The output folder, checked against an earlier run's settings (or cleared)."""
    out_dir = Path(options.out_dir)
    settings = dict(options.settings(files), bundle_manifest_sha256=_bundle_fingerprint(options.bundle))
    run_file = out_dir / RUN_FILE
    if out_dir.exists() and options.overwrite:
        for child in out_dir.iterdir():
            if child.name.startswith(("part-", ".tmp-")) or child.name in (RUN_FILE, SUCCESS_FILE):
                child.unlink()
    if out_dir.exists() and any(out_dir.iterdir()):
        if not run_file.is_file():
            raise FileExistsError(f"{out_dir}: not empty and not the output of `siren score-corpus`; "
                                  "name another -o")
        earlier = json.loads(run_file.read_text())
        if earlier != settings:
            changed = sorted(k for k in set(earlier) | set(settings) if earlier.get(k) != settings.get(k))
            raise FileExistsError(f"{out_dir}: holds a run with other {', '.join(changed)}; rerun with the same "
                                  "inputs and options to finish it, or pass --overwrite")
    out_dir.mkdir(parents=True, exist_ok=True)
    run_file.write_text(json.dumps(settings, indent=1))
    return out_dir


def run_corpus(options: CorpusOptions, out: TextIO = sys.stderr) -> dict:
    """Score the corpus; returns the summary written to _SUCCESS."""
    options.check()
    files = input_files(options.inputs)
    out_dir = prepare_output(options, files)
    cleared = clear_temporaries(out_dir)
    shards = plan_shards(files, options.rows_per_shard)
    done = {s.key for s in shards if (out_dir / s.part_name(options.fmt)).is_file()}
    todo = [s for s in shards if s.key not in done]
    total = sum(s.rows for s in shards)
    planned_done = sum(s.rows for s in shards if s.key in done)
    print(f"siren score-corpus: {len(files)} file(s), {total:,} rows in {len(shards)} shard(s); "
          f"{len(done)} already written{f', {cleared} partial part(s) removed' if cleared else ''}",
          file=out, flush=True)
    skipped_messages: list[str] = []
    if todo:
        skipped_messages = _run_on_ray(options, out_dir, todo, Progress(total, planned_done, out))
    return _finish(options, out_dir, shards, skipped_messages, out)


def _run_on_ray(options: CorpusOptions, out_dir: Path, todo: list[Shard], progress: Progress) -> list[str]:
    import ray

    from .cluster import connect
    started_here = connect(options.address)
    try:
        import ray.data
        logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)   # "progress bars disabled"
        context = ray.data.DataContext.get_current()
        context.enable_progress_bars = False
        context.print_on_execution_start = False
        logging.getLogger("ray.data").setLevel(logging.WARNING)
        cpus = options.cpus_per_actor
        if cpus is None:
            cpus = max(1.0, ray.cluster_resources().get("CPU", 1.0) / options.actors) if started_here else 1.0
        guard_options = dict(options.guard_options)
        if options.device != "cuda" and options.gpus_per_actor == 0:
            guard_options.setdefault("intra_op_threads", max(1, int(cpus)))
        scorer_options = dict(threshold=options.threshold, onset=options.onset, sustain=options.sustain,
                              device=options.device, backend=options.backend, verify=options.verify,
                              **guard_options)
        items = [dict(s.to_dict(), key_=s.key) for s in todo]
        ds = ray.data.from_items(items, override_num_blocks=len(items))
        stage = ShardStage.configured(bundle=options.bundle, out_dir=str(out_dir), fmt=options.fmt,
                                      errors=options.errors, batch_size=options.batch_size,
                                      scorer_options=scorer_options)
        ds = ds.map_batches(stage, batch_size=1, compute=ray.data.ActorPoolStrategy(size=options.actors),
                            num_cpus=cpus, num_gpus=options.gpus_per_actor or None)
        skipped: list[str] = []
        for row in ds.iter_rows():
            if row["error"]:
                raise CorpusInputError(f"{row['error']}; fix the input or pass --errors skip "
                                       "(the parts written so far are kept: rerun to continue)")
            skipped.extend(json.loads(row["skipped"]))
            progress.add(int(row["rows"]) + len(json.loads(row["skipped"])))
        progress.add(0, final=True)
        return skipped
    finally:
        if started_here:
            ray.shutdown()


class CorpusInputError(ValueError):
    """A bad record in the corpus (errors="fail")."""


def _finish(options: CorpusOptions, out_dir: Path, shards: list[Shard], skipped: list[str], out: TextIO) -> dict:
    for message in skipped[:20]:
        print(f"siren score-corpus: skipped {message}", file=out)
    if len(skipped) > 20:
        print(f"siren score-corpus: ... and {len(skipped) - 20} more skipped", file=out)
    parts = [out_dir / s.part_name(options.fmt) for s in shards]
    missing = [p.name for p in parts if not p.is_file()]
    if missing:
        raise RuntimeError(f"{len(missing)} part(s) missing after the run (first: {missing[0]}); rerun to finish")
    rows = sum(part_rows(p) for p in parts)
    planned = sum(s.rows for s in shards)
    summary = {"rows": rows, "skipped": planned - rows, "parts": len(parts), "format": options.fmt}
    if options.errors == "fail" and rows != planned:
        raise RuntimeError(f"the parts hold {rows} rows, the inputs {planned}: output is inconsistent; "
                           "rerun with --overwrite")
    (out_dir / SUCCESS_FILE).write_text(json.dumps(summary) + "\n")
    print(f"siren score-corpus: {rows:,} rows in {len(parts)} part(s) under {out_dir}", file=out, flush=True)
    return summary
