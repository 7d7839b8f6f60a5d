"""The `siren` command line.

Torch-free by construction: this package imports only the runtime at module level; the
subcommands that need torch (export, bench, demo), TensorRT (build) or the serving extra
(serve) import their stage inside the command, and a missing extra becomes one line naming
the `pip install` that fixes it.
"""
