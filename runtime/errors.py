"""Exception types the runtime raises on purpose, so callers can tell them apart."""


class BundleError(ValueError):
    """A bundle exists but cannot be trusted: malformed manifest, wrong format version,
    a file that does not match its recorded checksum, a path escaping the bundle."""


class BackendUnavailableError(RuntimeError):
    """The requested backend (or device) cannot run on this machine."""


def install_hint(extra: str) -> str:
    """How to install an extra: siren-deploy is installed from its checkout (or a wheel built
    there), not from a package index, so the line names the checkout."""
    return f'pip install ".[{extra}]" in the siren-deploy checkout'
