"""How `siren serve-ray` places replicas, as one typed object beside the serving and guard
settings (the options `siren serve` has are `ServeSettings`, shared, never repeated here)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from siren_runtime.settings import check_positive_int, setting

#: serving options Serve's HTTP proxy and `siren serve-ray` own, not the replicas
PROXY_OPTIONS = ("host", "port", "drain_s")


@dataclass
class ReplicaSettings:
    address: Optional[str] = setting(None, "an existing Ray cluster (auto, host:port, ray://...; default: start a "
                                           "local one on 127.0.0.1)", kind="str")
    replicas: Optional[int] = setting(None, "fixed number of guard replicas (default 1)", kind="int")
    autoscale: Optional[str] = setting(None, "autoscale between MIN and MAX replicas instead of --replicas",
                                       kind="str", metavar="MIN:MAX")
    target_ongoing_requests: Optional[float] = setting(
        None, "--autoscale: requests in flight per replica it aims at (default 2 x --max-batch)", kind="float")
    cpus_per_replica: float = setting(1.0, "CPUs each replica reserves", kind="float")
    gpus_per_replica: float = setting(0.0, "GPUs each replica reserves", kind="float")
    intra_op_threads: Optional[int] = setting(None, "ONNX Runtime CPU threads per replica (default: its CPUs)",
                                              kind="int")
    spin: bool = setting(True, "ONNX Runtime on a CPU: idle threads sleep instead of spinning (they then leave "
                               "the cores to Ray's own threads)", kind="no_flag", flag="--no-spin")

    def check_replicas(self) -> None:
        check_positive_int(self.replicas, "--replicas", optional=True)
        check_positive_int(self.intra_op_threads, "--intra-op-threads", optional=True)
        if self.replicas is not None and self.autoscale:
            raise ValueError("give --replicas or --autoscale MIN:MAX, not both")
        self.autoscale_range()
        for name in ("cpus_per_replica", "gpus_per_replica"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1024:
                raise ValueError(f"--{name.replace('_', '-')} must be a number in [0, 1024], got {value!r}")

    def autoscale_range(self) -> Optional[tuple]:
        if not self.autoscale:
            return None
        try:
            low, high = (int(v) for v in self.autoscale.split(":"))
        except ValueError:
            raise ValueError(f"--autoscale must be MIN:MAX (two integers), got {self.autoscale!r}") from None
        return low, high


__all__ = ["ReplicaSettings", "PROXY_OPTIONS"]
