"""`siren quantize`: a bundle -> an int8-weight bundle for CPUs and small boxes (torch-free;
needs `onnx` and `onnxruntime`: the `quantize` extra).

The decoder's projection MatMuls of the scoring and step graphs get int8 weights; the
embedding gather, the selected-neuron gather, the pooling, the MLP head and the softmax stay
fp32. The work goes initializer by initializer, so memory stays near the output's size, and
the result passes the decision gate (`siren_quantize.gate`) before it appears.
"""
