"""Serving a bundle (torch-free): Triton model repositories and `siren serve`, an HTTP server
with OpenAI's moderation API, vLLM's /classify, stream sessions and Prometheus metrics.

Imports only the runtime; the HTTP server's stack (Starlette, uvicorn, prometheus_client)
is the `serve` extra and is imported by `siren_serving.server` alone.
"""
