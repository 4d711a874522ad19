"""Load an adapter folder of a run (or a Hub adapter repo) together with its base model.

A run directory names a local base model relative to the adapter folder (``../base_model``) so it can
be copied anywhere. PEFT's `AutoPeftModelForCausalLM` resolves such a path against the process's working
directory, not the adapter folder; this loader resolves it against the folder, then loads the adapter with
plain `PeftModel.from_pretrained`. Hub repos (whose config always names a Hub id) go straight to PEFT.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from peft import AutoPeftModelForCausalLM, PeftModel
from transformers import AutoModelForCausalLM

from hf_fcmoe.adapters.peft_quirks import muted_checkpointing_probe


def resolve_base_model(adapter_dir: str | Path) -> str:
    """The base model an adapter folder names: a Hub id, or a local folder resolved against `adapter_dir`."""
    config_path = Path(adapter_dir) / "adapter_config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{adapter_dir} is not a PEFT adapter folder (no adapter_config.json)")
    base = json.loads(config_path.read_text()).get("base_model_name_or_path")
    if not base:
        raise ValueError(f"{config_path} names no base model (base_model_name_or_path is empty)")
    local = Path(adapter_dir) / base
    if not os.path.isabs(base) and (base.startswith(".") or local.is_dir()):
        if not local.is_dir():
            raise FileNotFoundError(
                f"base model {base!r} of {adapter_dir} not found at {local}: copy the whole run directory"
            )
        return str(local)
    return base


def load_adapter_model(adapter: str | Path, revision: str | None = None, **kwargs) -> PeftModel:
    """`PeftModel` of a run's adapter folder (global/, personalized/<id>/, rounds/<t>/global/) or a Hub repo."""
    with muted_checkpointing_probe():
        if not Path(adapter).is_dir():
            return AutoPeftModelForCausalLM.from_pretrained(str(adapter), revision=revision, **kwargs)
        base = AutoModelForCausalLM.from_pretrained(resolve_base_model(adapter), **kwargs)
        return PeftModel.from_pretrained(base, str(adapter), **kwargs)
