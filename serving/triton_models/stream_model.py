"""Triton Python-backend model `siren_stream`: incremental streaming, one session per sequence.

Requests of one sequence carry the new text (DELTA); the response is the score of the whole
text so far, exactly `score(prefix)`, computed from the stream's KV cache. The sequence
batcher (oldest strategy) hands one execute call requests from many live sequences; they are
stepped together with `feed_batch` (a sequence that appears twice waits for the next round).
START opens (or restarts) a session, END frees it after answering; sessions idle longer than
Triton's idle timeout are freed too, since Triton does not tell the model about them.

A trajectory bundle's sequences are agent runs: each request carries the run's new messages
(MESSAGES, a JSON list; TOOLS, JSON, with the START request) and the response is the verdict
of the whole run so far, running only the new turns' tokens.
"""
import json
import os
import time

import numpy as np
import triton_python_backend_utils as pb_utils

from siren_runtime import load_guard


def _flag(request, name):
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    return bool(tensor is not None and tensor.as_numpy().reshape(-1)[0])


def _one(request, name, optional=False):
    """One string input of one request (None when optional and absent)."""
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    if tensor is None:
        if optional:
            return None
        raise ValueError(f"send {name}")
    values = tensor.as_numpy().reshape(-1)
    if values.size != 1:
        raise ValueError(f"send one {name} per request, got {values.size}")
    return values[0].decode("utf-8") if isinstance(values[0], bytes) else str(values[0])


class TritonPythonModel:
    def initialize(self, args):
        folder = os.path.join(args["model_repository"], args["model_version"], "bundle")
        device = "cuda" if args.get("model_instance_kind") == "GPU" else "cpu"
        params = json.loads(args["model_config"]).get("parameters", {})
        self.max_sessions = int(params.get("max_sessions", {}).get("string_value", "64"))
        self.idle_seconds = float(params.get("idle_seconds", {}).get("string_value", "300"))
        # Files were checked against the manifest when the repository was written.
        self.guard = load_guard(folder, device=device, verify=False)
        self.runs = self.guard.bundle.guard.kind == "trajectory"
        self.sessions = {}          # correlation id -> [StreamSession, last used]

    def _parse(self, request):
        corrid = pb_utils.get_input_tensor_by_name(request, "CORRID")
        if corrid is None:
            raise ValueError("siren_stream is a sequence model: send sequence_id / sequence_start / sequence_end")
        start = _flag(request, "START")
        if self.runs:                 # the new messages (and, to open, the tools)
            messages = json.loads(_one(request, "MESSAGES"))
            if not isinstance(messages, list):
                raise ValueError("MESSAGES must be a JSON list of chat messages")
            tools = _one(request, "TOOLS", optional=True)
            text = (messages, json.loads(tools) if tools else None)
        else:
            text = _one(request, "DELTA")
        return int(corrid.as_numpy().reshape(-1)[0]), start, _flag(request, "END"), text

    def _drop_idle(self, now):
        for key in [k for k, (_, used) in self.sessions.items() if now - used > self.idle_seconds]:
            self.sessions.pop(key)[0].reset()

    def execute(self, requests):
        now = time.monotonic()
        self._drop_idle(now)
        responses = [None] * len(requests)
        pending = []
        for n, request in enumerate(requests):
            try:
                pending.append((n, *self._parse(request)))
            except (ValueError, UnicodeDecodeError) as e:     # json's errors are ValueErrors
                responses[n] = pb_utils.InferenceResponse(error=pb_utils.TritonError(f"siren_stream: {e}"))
        while pending:
            batch, later, seen = [], [], set()
            for item in pending:              # a sequence at most once per feed_batch, in order
                (later if item[1] in seen else batch).append(item)
                seen.add(item[1])
            pending = later
            fed = []
            for n, corrid, start, end, text in batch:
                if start:
                    if corrid in self.sessions:
                        self.sessions.pop(corrid)[0].reset()
                    if len(self.sessions) >= self.max_sessions:
                        responses[n] = pb_utils.InferenceResponse(error=pb_utils.TritonError(
                            f"siren_stream: {len(self.sessions)} sequences are open (max_sessions)"))
                        continue
                    try:
                        opened = (self.guard.session(tools=text[1]) if self.runs
                                  else self.guard.stream(keep_text=False))
                    except (TypeError, ValueError) as e:
                        responses[n] = pb_utils.InferenceResponse(error=pb_utils.TritonError(f"siren_stream: {e}"))
                        continue
                    self.sessions[corrid] = [opened, now]
                elif corrid not in self.sessions:
                    responses[n] = pb_utils.InferenceResponse(error=pb_utils.TritonError(
                        f"siren_stream: sequence {corrid} has no open session (not started, ended or idle too long)"))
                    continue
                fed.append((n, corrid, end, text))
            if not fed:
                continue
            results, errors = self._feed(fed)
            for (n, corrid, end, _), result, error in zip(fed, results, errors):
                if error is not None:
                    responses[n] = pb_utils.InferenceResponse(error=pb_utils.TritonError(f"siren_stream: {error}"))
                else:
                    score = np.asarray([[result.score]], dtype=np.float32)
                    responses[n] = pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor("SCORE", score)])
                    self.sessions[corrid][1] = now
                if end and corrid in self.sessions:
                    self.sessions.pop(corrid)[0].reset()
        return responses

    def _feed(self, fed):
        """Step every fed sequence together -> (results, errors). A refused input is that
        request's error alone: each is checked first, then the rest step in one call."""
        sessions = [self.sessions[c][0] for _, c, _, _ in fed]
        inputs = [t[0] if self.runs else t for *_, t in fed]
        errors = [None] * len(fed)
        prepared = []
        for i, (session, item) in enumerate(zip(sessions, inputs)):
            try:
                prepared.append(self.guard.prepare_append(session, item) if self.runs
                                else self.guard.prepare_feed(session, item))
            except (TypeError, ValueError) as e:
                errors[i], prepared = str(e), prepared + [None]
        ready = [p for p in prepared if p is not None]
        try:
            done = iter(self.guard.feed_prepared(ready)) if ready else iter(())
            results = [None if p is None else next(done) for p in prepared]
        except Exception as e:   # the whole round: every request of it is told
            results, errors = [None] * len(fed), [e_ if e_ is not None else str(e) for e_ in errors]
        return results, errors

    def finalize(self):
        self.sessions.clear()
        self.guard.close()
