"""TensorRT engines for SIREN bundles: `siren build` and `siren verify`.

Needs the `tensorrt` extra (tensorrt + cuda-python) and an NVIDIA GPU for building;
profile computation, manifest records and the parity gate run anywhere.
"""
__all__ = ["EngineUnavailableError"]


class EngineUnavailableError(RuntimeError):
    """TensorRT or a usable GPU is missing; the message is one line saying which."""
