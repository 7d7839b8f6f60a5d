"""Triton Python-backend model `siren_scorer`: ids -> score with siren_runtime on ONNX Runtime.

The flavor that runs on a CPU-only server; a content or a trajectory bundle alike (its
ids come from siren_tokenizer). Requests of one dynamic batch are unpadded by
their masks and re-grouped by length exactly as `SirenGuard.score_batch` does.
"""
import os

import numpy as np
import triton_python_backend_utils as pb_utils

from siren_runtime import load_guard


class TritonPythonModel:
    def initialize(self, args):
        folder = os.path.join(args["model_repository"], args["model_version"], "bundle")
        device = "cuda" if args.get("model_instance_kind") == "GPU" else "cpu"
        # Files were checked against the manifest when the repository was written.
        self.guard = load_guard(folder, device=device, incremental_streaming=False, verify=False)

    def execute(self, requests):
        id_lists, owners, errors = [], [], {}
        for n, request in enumerate(requests):
            try:
                ids = pb_utils.get_input_tensor_by_name(request, "input_ids").as_numpy()
                mask = pb_utils.get_input_tensor_by_name(request, "attention_mask").as_numpy()
                if ids.shape != mask.shape or ids.ndim != 2 or ids.shape[0] == 0:
                    raise ValueError(f"bad input shapes {ids.shape} / {mask.shape}")
                rows = [[int(t) for t, m in zip(row_ids, row_mask) if m] for row_ids, row_mask in zip(ids, mask)]
                if not all(rows):
                    raise ValueError("a row has no real token (attention_mask all zero)")
                id_lists.extend(rows)
                owners.extend([n] * len(rows))
            except Exception as e:  # reported on this request only
                errors[n] = str(e)
        scores = self.guard.score_token_ids(id_lists) if id_lists else np.zeros(0, np.float32)
        responses = []
        for n in range(len(requests)):
            if n in errors:
                responses.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(f"siren_scorer: {errors[n]}")))
                continue
            mine = np.asarray([s for s, o in zip(scores, owners) if o == n], dtype=np.float32).reshape(-1, 1)
            responses.append(pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor("SCORE", mine)]))
        return responses
