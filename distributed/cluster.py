"""Joining a Ray cluster, or starting a private local one, the same way for every command."""
from __future__ import annotations

import logging
import os
import signal
import threading
from typing import Optional

from siren_runtime.errors import install_hint

#: Ray advertises a Linux node by its outward address even when told 127.0.0.1; this switch
#: (Ray's own, meant for laptops) keeps a private local cluster on the loopback interface
LOOPBACK_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


def prefer_loopback() -> None:
    """Call before Ray is first imported, when this process will start its own cluster."""
    os.environ.setdefault(LOOPBACK_ENV, "0")


def connect(address: Optional[str] = None, num_cpus: Optional[int] = None) -> bool:
    """Connect to `address` (an existing cluster: "auto", "host:port", "ray://..."), or start
    a local cluster bound to 127.0.0.1 when it is None. Returns True when this call started
    Ray (the caller shuts it down); a process already connected is left as it is."""
    try:
        import ray
    except ImportError:
        raise ImportError(f"the Ray paths need Ray: {install_hint('ray')}") from None
    if ray.is_initialized():
        return False
    quiet = dict(logging_level=logging.WARNING, log_to_driver=True)
    main = threading.current_thread() is threading.main_thread()
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)} if main else {}
    if address is None:
        # a private cluster on the loopback: Ray's notice that it enabled token auth is not the
        # user's to act on (it only cluttered each run)
        logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, **quiet)
    else:
        ray.init(address=address, **quiet)
    for sig, handler in handlers.items():     # a driver's ^C / SIGTERM stay the caller's (cleanup runs)
        signal.signal(sig, handler)
    return True
