"""Load the base MoE model and tokenizer named by a config (Hub id, local folder or tiny:<type>)."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from hf_fcmoe.models.families import assert_moe_model, build_tiny_moe

TINY_PREFIX = "tiny:"


def is_tiny(model_name_or_path: str) -> bool:
    return model_name_or_path.startswith(TINY_PREFIX)


def _offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.is_offline_mode())


def _unreachable_message(name: str, reason: str) -> str:
    return (
        f"cannot load model {name!r} from the Hub: {reason}. Without network, download it elsewhere "
        "(`hf download` / save_pretrained) and set model_name_or_path to that local folder, or use a tiny "
        "built-in model (tiny:mixtral); with a cached copy, set HF_HUB_OFFLINE=1"
    )


def check_model_reachable(model_name_or_path: str) -> None:
    """Fail within seconds, in one line, when a Hub model id cannot be reached (a local folder always passes).

    Without network `from_pretrained` retries for ~30 s and then prints a long traceback (measured: 88 lines).
    """
    from hf_fcmoe.data.sources import HUB_PROBE_TIMEOUT_S, hub_reachable

    if Path(model_name_or_path).expanduser().exists():
        return
    if model_name_or_path.startswith((".", "/", "~")) or model_name_or_path.count("/") > 1:
        raise FileNotFoundError(f"model folder {model_name_or_path!r} does not exist")
    if not _offline() and not hub_reachable():
        reason = f"no connection within {HUB_PROBE_TIMEOUT_S:g} s"
        raise ConnectionError(_unreachable_message(model_name_or_path, reason))


def model_load_error(model_name_or_path: str, error: OSError) -> Exception:
    """One line for a model/tokenizer/config that `from_pretrained` could not read."""
    first = (str(error).strip().splitlines() or [type(error).__name__])[0]
    if Path(model_name_or_path).expanduser().exists():
        return ValueError(f"cannot load model folder {model_name_or_path!r}: {first}")
    reason = "offline mode and no cached copy" if _offline() else first
    return ConnectionError(_unreachable_message(model_name_or_path, reason))


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

    check_model_reachable(model_name_or_path)
    try:
        config = AutoConfig.from_pretrained(model_name_or_path)
        assert_moe_model(config)
        model = AutoModelForCausalLM.from_pretrained(model_name_or_path, dtype=dtype or "auto")
        tokenizer = AutoTokenizer.from_pretrained(model_name_or_path)
    except OSError as error:  # transformers' "can't load ... / not a valid model identifier / offline" errors
        raise model_load_error(model_name_or_path, error) from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def save_base_model(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, path: Path) -> str:
    """Save a (tiny, built-in-code) base model so adapters can point at it; returns the absolute path."""
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path.resolve())
