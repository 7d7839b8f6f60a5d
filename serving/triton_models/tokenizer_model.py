"""Triton Python-backend model `siren_tokenizer`: text (or an agent run) -> input_ids / attention_mask.

Cleans and joins text with siren_runtime's own functions (one implementation of what
"the text" means) and tokenizes with the bundle's tokenizer. A trajectory bundle's runs
(MESSAGES and TOOLS, JSON) are rendered with the backbone's chat template by siren_runtime's
TrajectoryEncoder. Each request's ids are padded to its own length; the scorer strips
padding by the mask.
"""
import json
import os

import triton_python_backend_utils as pb_utils

from siren_runtime.bundle import read_bundle
from siren_runtime.text import clean_text, join_prompt_response
from siren_runtime.tokenization import TextEncoder


def _strings(request, name):
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    if tensor is None:
        return None
    return [v.decode("utf-8") if isinstance(v, bytes) else str(v) for v in tensor.as_numpy().reshape(-1)]


class TritonPythonModel:
    def initialize(self, args):
        folder = os.path.join(args["model_repository"], args["model_version"], "bundle")
        bundle = read_bundle(folder)
        self.runs = None
        if bundle.guard.kind == "trajectory":
            from siren_runtime.agent_guard import TrajectoryEncoder
            self.runs = TrajectoryEncoder(bundle)
        else:
            self.encoder = TextEncoder(bundle.path(bundle.tokenizer_path), bundle.inference.max_length,
                                       bundle.inference.pad_token_id)

    def _run_ids(self, request):
        """A trajectory bundle's rows: MESSAGES (and TOOLS) as JSON -> rendered, truncated ids."""
        from siren_runtime.trajectory import from_openai
        messages = _strings(request, "MESSAGES")
        if messages is None:
            raise ValueError("send MESSAGES (the run's chat messages as JSON) and optionally TOOLS")
        tools = _strings(request, "TOOLS") or [None] * len(messages)
        if len(tools) != len(messages):
            raise ValueError("MESSAGES and TOOLS must have the same batch size")
        ids = []
        for m, t in zip(messages, tools):
            try:
                run = from_openai(json.loads(m), json.loads(t) if t else None)
            except json.JSONDecodeError as e:
                raise ValueError(f"MESSAGES and TOOLS must be JSON: {e}") from None
            ids.append(self.runs.ids(self.runs.render(run)))
        return self.runs.pad(ids)

    def _texts(self, request):
        text, prompt, response = (_strings(request, n) for n in ("TEXT", "PROMPT", "RESPONSE"))
        if text is not None and (prompt is not None or response is not None):
            raise ValueError("send TEXT, or PROMPT/RESPONSE, not both")
        if text is not None:
            return text
        if prompt is None and response is None:
            raise ValueError("send TEXT, or at least one of PROMPT/RESPONSE")
        rows = len(prompt if prompt is not None else response)
        prompt = prompt if prompt is not None else [None] * rows
        response = response if response is not None else [None] * rows
        if len(prompt) != len(response):
            raise ValueError("PROMPT and RESPONSE must have the same batch size")
        return [join_prompt_response(p, r) for p, r in zip(prompt, response)]

    def execute(self, requests):
        responses = []
        for request in requests:
            try:
                if self.runs is not None:
                    ids, mask = self._run_ids(request)
                else:
                    texts = self._texts(request)
                    if not texts:
                        raise ValueError("empty batch")
                    ids, mask = self.encoder.pad(self.encoder.token_ids([clean_text(t) for t in texts]))
                responses.append(pb_utils.InferenceResponse(output_tensors=[
                    pb_utils.Tensor("input_ids", ids), pb_utils.Tensor("attention_mask", mask)]))
            except (ValueError, UnicodeDecodeError, TypeError) as e:
                responses.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(f"siren_tokenizer: {e}")))
        return responses
