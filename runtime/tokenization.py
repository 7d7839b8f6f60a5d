"""Tokenization with the bundle's own tokenizer.json, matching llm-siren's call:
special tokens as the tokenizer's post-processor adds them (none for Qwen3), right
padding with the pad id, truncation keeping the first `max_length` tokens.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np


class TextEncoder:
    def __init__(self, tokenizer_path: Path, max_length: int, pad_token_id: int):
        from tokenizers import Tokenizer

        self.max_length = int(max_length)
        self.pad_token_id = int(pad_token_id)
        self._tokenizer = Tokenizer.from_file(str(tokenizer_path))
        self._tokenizer.no_padding()
        self._tokenizer.enable_truncation(max_length=self.max_length, direction="right")

    @staticmethod
    def _check_encodable(texts: list[str]) -> None:
        # tokenizers raises a bare TypeError for lone surrogates; say what is wrong instead.
        for i, t in enumerate(texts):
            try:
                t.encode("utf-8")
            except UnicodeEncodeError as e:
                raise ValueError(
                    f"text {i} is not valid Unicode: code point {t[e.start]!r} at index "
                    f"{e.start} is a lone surrogate") from None

    def token_ids(self, texts: list[str]) -> list[list[int]]:
        """Token ids per text, truncated, unpadded."""
        self._check_encodable(texts)
        if len(texts) == 1:  # the streaming path: skip the batch encoder's thread-pool round trip
            return [self._tokenizer.encode(texts[0], add_special_tokens=True).ids]
        return [enc.ids for enc in self._tokenizer.encode_batch(texts, add_special_tokens=True)]

    def pad(self, id_lists: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
        """Right-pad to the longest list: (input_ids, attention_mask), both int64 [n, L]."""
        width = max(len(ids) for ids in id_lists)
        input_ids = np.full((len(id_lists), width), self.pad_token_id, dtype=np.int64)
        attention_mask = np.zeros((len(id_lists), width), dtype=np.int64)
        for row, ids in enumerate(id_lists):
            input_ids[row, :len(ids)] = ids
            attention_mask[row, :len(ids)] = 1
        return input_ids, attention_mask
