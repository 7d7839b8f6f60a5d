"""Export a SIREN artifact + its Qwen3 backbone into a self-describing bundle
(one ONNX graph emitting the score, the tokenizer, and a manifest).

Needs torch; the runtime (`siren_runtime`) never imports this package.
"""
__version__ = "0.1.0"
