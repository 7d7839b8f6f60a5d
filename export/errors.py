"""Errors the exporter raises on purpose (bad artifacts, failed self-checks)."""


class ArtifactError(ValueError):
    """The SIREN artifact is malformed, inconsistent, or of the wrong kind."""


class ParityError(RuntimeError):
    """The written ONNX graph disagrees with the torch module beyond tolerance."""
