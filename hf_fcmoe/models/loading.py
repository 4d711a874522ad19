"""Load the base MoE model and tokenizer named by a config (Hub id, local folder or tiny:<type>)."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from hf_fcmoe.models.families import assert_moe_model, build_tiny_moe

TINY_PREFIX = "tiny:"


def is_tiny(model_name_or_path: str) -> bool:
    return model_name_or_path.startswith(TINY_PREFIX)


def load_base_model(
    model_name_or_path: str, seed: int = 0, num_experts: int | None = None, dtype: torch.dtype | None = None
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The base model and its tokenizer; a clear error if the model is not a supported MoE.

    ``tiny:<model_type>`` builds a random-initialised tiny model (seeded) with a local byte tokenizer.
    Anything else goes through ``from_pretrained`` (Hub id or local folder), checking the config first
    so a dense model is refused before any weights are read.
    """
    if is_tiny(model_name_or_path):
        overrides = {}
        if num_experts is not None:
            from hf_fcmoe.models.families import get_family

            overrides[get_family(model_name_or_path[len(TINY_PREFIX) :]).num_experts_attr] = num_experts
        return build_tiny_moe(model_name_or_path[len(TINY_PREFIX) :], seed=seed, **overrides)
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_name_or_path)
    assert_moe_model(config)
    model = AutoModelForCausalLM.from_pretrained(model_name_or_path, dtype=dtype or "auto")
    tokenizer = AutoTokenizer.from_pretrained(model_name_or_path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def save_base_model(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, path: Path) -> str:
    """Save a (tiny, built-in-code) base model so adapters can point at it; returns the absolute path."""
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path.resolve())
