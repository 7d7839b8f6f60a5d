"""Text preparation, exactly as llm-siren does it before tokenizing.

The head was fitted on raw text, so chat-template packaging is replaced by a space and
whitespace is normalised; the same function serves the runtime, streaming and Triton so
there is one implementation of what "the text" means.
"""
from __future__ import annotations

import re
from typing import Optional

CHAT_ARTIFACTS = (
    "<|im_start|>", "<|im_end|>", "<|im_sep|>",
    "<|system|>", "<|user|>", "<|assistant|>",
    "<|begin_of_text|>", "<|end_of_text|>",
    "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
    "<|endoftext|>", "<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>",
    "<<SYS>>", "<</SYS>>", "[INST]", "[/INST]",
    "<s>", "</s>", "<|s|>", "<|/s|>",
)

_ARTIFACT_RE = re.compile("|".join(re.escape(a) for a in CHAT_ARTIFACTS))
_HORIZONTAL_SPACE_RE = re.compile(r"[ \t]+")
_NEWLINE_RUN_RE = re.compile(r"\n{3,}")

# What an empty text becomes: the backbone needs at least one token to pool over.
EMPTY_TEXT = " "


def clean_text(text: str) -> str:
    """Strip chat artifacts and normalise whitespace; never returns an empty string."""
    if not text:
        return EMPTY_TEXT
    cleaned = _ARTIFACT_RE.sub(" ", text)
    cleaned = _HORIZONTAL_SPACE_RE.sub(" ", cleaned)
    cleaned = _NEWLINE_RUN_RE.sub("\n\n", cleaned)
    cleaned = cleaned.strip()
    return cleaned or EMPTY_TEXT


def join_prompt_response(prompt: Optional[str], response: Optional[str]) -> str:
    """The response-level form the head was trained on: non-empty parts joined by a newline."""
    return "\n".join(p for p in (prompt, response) if p is not None and p != "")
