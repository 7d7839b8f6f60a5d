"""The `siren` command: export, score, demo.

Heavy imports (torch, transformers) happen inside the subcommands that need them, so
`siren score` runs on a machine with only the runtime installed. Errors print one line
(set SIREN_DEBUG=1 for the traceback).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Optional, Sequence

EXIT_ERROR = 2


def _cmd_export(args) -> int:
    from .pipeline import export_bundle
    bundle = export_bundle(args.artifact, args.output, backbone=args.backbone, dtype=args.dtype,
                           readout=args.readout, overwrite=args.overwrite,
                           parity_tolerance=args.parity_tolerance, cache_dir=args.cache_dir,
                           streaming=not args.no_streaming)
    print(bundle)
    return 0


def _cmd_score(args) -> int:
    from siren_runtime import SirenGuard
    from siren_runtime.validation import check_threshold

    if args.texts and (args.prompt is not None or args.response is not None):
        raise ValueError("give TEXT arguments or --prompt/--response, not both")
    threshold = check_threshold(args.threshold, 0.5) if args.threshold is not None else None
    guard = SirenGuard.from_pretrained(args.bundle, device=args.device, backend=args.backend)
    if args.prompt is not None or args.response is not None:
        texts = [None]
        results = [guard.score(prompt=args.prompt, response=args.response, threshold=threshold)]
        labels = [f"prompt={args.prompt!r} response={args.response!r}"]
    else:
        texts = args.texts or read_lines(sys.stdin.buffer, args.errors)
        results = guard.score_batch(texts, threshold=threshold) if texts else []
        labels = texts
    for label, result in zip(labels, results):
        if args.json:
            print(json.dumps({"text": label, **result.to_dict()}, ensure_ascii=False))
        else:
            shown = label.replace("\n", "\\n")
            shown = shown if len(shown) <= 70 else shown[:67] + "..."
            print(f"{result.score:.6f}\t{'HARMFUL' if result.is_harmful else 'ok'}\t{shown}")
    return 0


def read_lines(stream, errors: str = "fail") -> list[str]:
    """One text per line of a byte stream, each decoded as UTF-8 on its own: a bad line is
    named by its number (errors="fail": nothing is scored) or skipped with a note on stderr
    (errors="skip"); the other lines are never lost to it."""
    texts = []
    for number, raw in enumerate(stream, start=1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            problem = f"line {number}: not valid UTF-8 (byte 0x{raw[e.start]:02x} at byte {e.start + 1})"
            if errors == "skip":
                print(f"siren score: skipped {problem}", file=sys.stderr)
                continue
            raise ValueError(problem + "; fix the input or pass --errors skip") from None
        texts.append(line[:-1] if line.endswith("\n") else line)
    return texts


def _cmd_demo(args) -> int:
    from .demo import run_demo
    return run_demo(args.workdir)


def _cmd_bench(args) -> int:
    from .bench import format_table, run_bench
    rows, texts, tokens = run_bench(args.bundle, reference=args.reference, texts_file=args.texts, batch=args.batch,
                                    repeat=args.repeat, breakdown=args.breakdown, backend=args.backend)
    print(format_table(rows, texts, tokens))
    return 0


def _cmd_triton(args) -> int:
    from .triton_repo import write_repository
    repo = write_repository(args.bundle, args.output, scorer=args.scorer, max_batch=args.max_batch,
                            instances=args.instances, name=args.name, overwrite=args.overwrite)
    print(repo)
    return 0


def _cmd_build(args) -> int:
    from siren_engines.build import build_engines
    result = build_engines(args.bundle, precision=args.precision, max_batch=args.max_batch, max_seq=args.max_seq,
                           opt_batch=args.opt_batch, opt_seq=args.opt_seq, workspace_gib=args.workspace,
                           timing_cache=args.timing_cache, streaming=not args.no_streaming, stream_batch=args.stream_batch,
                           reference_bundle=args.reference_bundle)
    for entry in result["engines"]:
        print(f"{args.bundle}/{entry['path']}")
    report = result["engines"][0].get("verify") or {}
    return 1 if report.get("passed") is False else 0


def _cmd_verify(args) -> int:
    from siren_engines.verify import format_report, verify_bundle
    report = verify_bundle(args.bundle, backend=args.backend, reference_bundle=args.reference_bundle,
                           device=args.device)
    print(json.dumps(report) if args.json else format_report(report))
    return 0 if report["passed"] else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="siren", description="SIREN guard deployment: export, score, demo")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("export", help="export a SIREN artifact + backbone into a bundle (needs torch)")
    p.add_argument("artifact", help="Hugging Face repo id (e.g. UofTCSSLab/SIREN-Qwen3-4B) or local folder")
    p.add_argument("-o", "--output", required=True, help="bundle directory to create")
    p.add_argument("--backbone", help="backbone id or local path (overrides the artifact's pinned base model)")
    p.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default="fp32", help="backbone precision in the graph")
    p.add_argument("--readout", choices=["runtime", "training"], default="runtime",
                   help="runtime = llm-siren (last layer final-normed); training = raw layer outputs (paper)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing bundle")
    p.add_argument("--parity-tolerance", type=float, help="max |Δscore| allowed by the export self-check")
    p.add_argument("--cache-dir", help="Hugging Face cache directory")
    p.add_argument("--no-streaming", action="store_true",
                   help="skip the incremental step graph (score_streaming then rescores the prefix)")
    p.set_defaults(func=_cmd_export)

    p = sub.add_parser("score", help="score texts with a bundle (torch-free)")
    p.add_argument("bundle")
    p.add_argument("texts", nargs="*", default=[], metavar="TEXT",
                   help="texts to score (default: one per line from stdin)")
    p.add_argument("--prompt")
    p.add_argument("--response")
    p.add_argument("--threshold", type=float)
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    p.add_argument("--errors", choices=["fail", "skip"], default="fail",
                   help="a stdin line that is not valid UTF-8: fail naming it (default) or skip it")
    p.add_argument("--backend", help="onnxruntime (default: best available)")
    p.add_argument("--device", choices=["cpu", "cuda"], help="default: GPU when usable")
    p.set_defaults(func=_cmd_score)

    p = sub.add_parser("bench", help="throughput, latency, RSS and import time vs llm-siren on the same weights")
    p.add_argument("bundle")
    p.add_argument("--reference", help="the SIREN artifact the bundle came from: also run llm-siren on it")
    p.add_argument("--texts", help="file with one text per line (default: 12 texts of 4-160 words)")
    p.add_argument("--batch", type=int, help="repeat/trim the texts to this many per score_batch call")
    p.add_argument("--repeat", type=int, default=3, help="timed repetitions (best is reported)")
    p.add_argument("--breakdown", action="store_true",
                   help="also time the torch module (truncated; padded vs length-grouped) to split the gain")
    p.add_argument("--backend", help="runtime backend (default: best available)")
    p.set_defaults(func=_cmd_bench)

    p = sub.add_parser("triton", help="write a Triton Inference Server model repository from a bundle")
    p.add_argument("bundle")
    p.add_argument("-o", "--output", required=True, help="model repository directory to create")
    p.add_argument("--scorer", choices=["python", "onnxruntime", "tensorrt"], default="python",
                   help="python: siren_runtime on ONNX Runtime (CPU servers); onnxruntime: onnxruntime_onnx; "
                        "tensorrt: the bundle's engine")
    p.add_argument("--max-batch", type=int, default=32)
    p.add_argument("--instances", type=int, default=1)
    p.add_argument("--name", default="siren_guard", help="ensemble model name")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=_cmd_triton)

    p = sub.add_parser("build", help="build TensorRT engines into a bundle (needs TensorRT and an NVIDIA GPU)")
    p.add_argument("bundle")
    p.add_argument("--precision", choices=["fp32", "fp16", "bf16"],
                   help="must match the bundle's export dtype (precision lives in the graph)")
    p.add_argument("--max-batch", type=int, default=32)
    p.add_argument("--max-seq", type=int, help="default: the bundle's max_length")
    p.add_argument("--opt-batch", type=int)
    p.add_argument("--opt-seq", type=int)
    p.add_argument("--workspace", type=float, help="builder workspace limit in GiB")
    p.add_argument("--timing-cache", help="timing cache file (default: BUNDLE/engines/timing.cache)")
    p.add_argument("--no-streaming", action="store_true", help="skip the streaming step engine")
    p.add_argument("--stream-batch", type=int, default=16, help="streams one step engine call takes (default 16)")
    p.add_argument("--reference-bundle", help="fp32 export to verify an fp16/bf16 engine against")
    p.set_defaults(func=_cmd_build)

    p = sub.add_parser("verify", help="parity gate: a backend vs the fp32 graph on ONNX Runtime CPU")
    p.add_argument("bundle")
    p.add_argument("--backend", choices=["tensorrt", "onnxruntime"], default="onnxruntime")
    p.add_argument("--device", choices=["cpu", "cuda"])
    p.add_argument("--reference-bundle", help="fp32 bundle of the same artifact (default: BUNDLE when it is fp32)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_verify)

    p = sub.add_parser("demo", help="build a tiny random model, export it and score it (no network)")
    p.add_argument("--workdir", help="where to build (default: a new temporary directory)")
    p.set_defaults(func=_cmd_demo)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
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
    except Exception as e:  # one clear line; the traceback only on request
        if os.environ.get("SIREN_DEBUG"):
            raise
        message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"siren {args.command}: error: {message}", file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
