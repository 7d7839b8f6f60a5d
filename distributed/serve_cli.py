"""`siren serve-ray`: deploy the Ray Serve app, say where it listens, hold it until ^C or
SIGTERM, then take it down (and the local cluster, when this command started one)."""
from __future__ import annotations

import signal
import sys
import threading

from siren_serving.settings import ServeConfig

from .cluster import connect
from .settings import PROXY_OPTIONS, ReplicaSettings


def app_args(config: ServeConfig, replicas: ReplicaSettings) -> dict:
    """The serving, guard and replica settings -> build_app's args (the names a Serve config
    file uses): every `siren serve` option but where to listen, which Serve's proxy owns."""
    config.check_all()
    replicas.check_replicas()
    out = {name: getattr(config, name) for name in ServeConfig.__dataclass_fields__
           if name not in PROXY_OPTIONS}
    out.update(cpus_per_replica=replicas.cpus_per_replica, gpus_per_replica=replicas.gpus_per_replica,
               intra_op_threads=replicas.intra_op_threads,
               guard_options={} if replicas.spin else {"spinning": False})
    scale = replicas.autoscale_range()
    if scale is not None:
        out.update(min_replicas=scale[0], max_replicas=scale[1],
                   target_ongoing_requests=replicas.target_ongoing_requests)
    else:
        out["replicas"] = replicas.replicas if replicas.replicas is not None else 1
    return out


def run_serve_ray(config: ServeConfig, replicas: ReplicaSettings) -> int:
    """Deploy, say where, hold until ^C/SIGTERM; after the signal the app keeps serving for
    config.drain_s seconds (a load balancer's grace), then Serve shuts it down gracefully."""
    from ray import serve

    from .serve_app import APP_NAME, build_app

    app = build_app(app_args(config, replicas))        # bad options fail before any cluster starts
    started_here = connect(replicas.address)
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        quiet = {"log_level": "WARNING", "enable_access_log": False}      # errors still show
        serve.start(http_options={"host": config.host, "port": config.port}, logging_config=quiet)
        serve.run(app, name=APP_NAME, route_prefix="/", blocking=False, logging_config=quiet)
        placed = ("autoscaling " + replicas.autoscale if replicas.autoscale
                  else f"{replicas.replicas or 1} replica(s)")
        print(f"siren serve-ray: {config.bundle} at http://{config.host}:{config.port} ({placed})",
              file=sys.stderr, flush=True)
        while not stop.wait(0.5):
            pass
        if config.drain_s > 0:
            stop.clear()
            print(f"siren serve-ray: draining for {config.drain_s:g} s (a second signal stops now)",
                  file=sys.stderr, flush=True)
            stop.wait(config.drain_s)
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
