"""`siren serve-ray`: deploy the Ray Serve app, say where it listens, hold it until ^C or
SIGTERM, then take it down (and the local cluster, when this command started one)."""
from __future__ import annotations

import signal
import sys
import threading

from .cluster import connect


def app_args(args) -> dict:
    """`siren serve-ray`'s options -> build_app's args (the names a Serve config file uses)."""
    out = {"bundle": args.bundle, "threshold": args.threshold, "model_name": args.model_name,
           "max_batch": args.max_batch, "max_wait_ms": args.max_wait_ms, "max_sessions": args.max_sessions,
           "session_ttl_s": args.session_ttl, "device": args.device, "backend": args.backend,
           "verify": not args.no_verify, "cpus_per_replica": args.cpus_per_replica,
           "gpus_per_replica": args.gpus_per_replica, "intra_op_threads": args.intra_op_threads,
           "guard_options": {"spinning": False} if getattr(args, "no_spin", False) else {}}
    if args.autoscale:
        if args.replicas is not None:
            raise ValueError("give --replicas or --autoscale MIN:MAX, not both")
        try:
            low, high = (int(v) for v in args.autoscale.split(":"))
        except ValueError:
            raise ValueError(f"--autoscale must be MIN:MAX (two integers), got {args.autoscale!r}") from None
        out.update(min_replicas=low, max_replicas=high, target_ongoing_requests=args.target_ongoing_requests)
    else:
        out["replicas"] = args.replicas if args.replicas is not None else 1
    return out


def run_serve_ray(args) -> int:
    from ray import serve

    from .serve_app import APP_NAME, build_app

    app = build_app(app_args(args))        # bad options fail before any cluster starts
    started_here = connect(args.address)
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        quiet = {"log_level": "WARNING", "enable_access_log": False}      # errors still show
        serve.start(http_options={"host": args.host, "port": args.port}, logging_config=quiet)
        serve.run(app, name=APP_NAME, route_prefix="/", blocking=False, logging_config=quiet)
        print(f"siren serve-ray: {args.bundle} at http://{args.host}:{args.port} "
              f"({'autoscaling ' + args.autoscale if args.autoscale else str(args.replicas or 1) + ' replica(s)'})",
              file=sys.stderr, flush=True)
        while not stop.wait(0.5):
            pass
        print("siren serve-ray: stopping", file=sys.stderr, flush=True)
        serve.delete(APP_NAME)
        return 0
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if started_here:
            serve.shutdown()
            import ray
            ray.shutdown()
