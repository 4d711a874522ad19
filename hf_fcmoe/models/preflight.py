"""Checks a run can fail on, done from configs alone before any weights are read.

The model config says whether the model is an MoE family and which LoRA targets exist in it; the environment
`accelerate launch` exports says how the run was launched (FSDP, DeepSpeed, how many processes, on what device).
A mismatch is one line naming the bad value and what to do, raised before gigabytes are loaded.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import torch
from transformers import AutoConfig, PretrainedConfig

from hf_fcmoe.models.families import get_family, tiny_moe_config

_TINY = "tiny:"
_WEIGHT_FILES = ("*.safetensors", "*.bin", "*.gguf")


def _flag(name: str) -> bool:
    return os.environ.get(name, "").lower() in ("1", "true", "yes")


def check_launch(world_size: int | None = None, cuda: bool | None = None) -> None:
    """Refuse accelerate launches that cannot serve a run (FSDP with one process, FSDP/DeepSpeed without GPUs)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1")) if world_size is None else world_size
    cuda = torch.cuda.is_available() if cuda is None else cuda
    for flag, name, config in (
        ("ACCELERATE_USE_FSDP", "FSDP", "fsdp.yaml"),
        ("ACCELERATE_USE_DEEPSPEED", "DeepSpeed ZeRO-3", "deepspeed_zero3.yaml"),
    ):
        if not _flag(flag):
            continue
        if not cuda:
            raise ValueError(
                f"{name} ({config}) needs GPUs and none is visible; on CPU launch with "
                "recipes/accelerate_configs/cpu.yaml or multi_cpu.yaml"
            )
        if world_size < 2:
            raise ValueError(
                f"{name} ({config}) with num_processes={world_size} shards nothing; set num_processes to the GPU "
                "count, or use single_gpu.yaml when the model fits one GPU"
            )
    if _flag("ACCELERATE_USE_DEEPSPEED") and importlib.util.find_spec("deepspeed") is None:
        raise ValueError("deepspeed_zero3.yaml needs DeepSpeed: pip install deepspeed (or launch with fsdp.yaml)")


def model_config_of(model_name_or_path: str, num_experts: int | None = None) -> PretrainedConfig | None:
    """The model config (tiny:<type>, a local folder with config.json, or a Hub id); None if it cannot be read here.

    An unreachable Hub id returns None: the loader reports that case itself.
    """
    if model_name_or_path.startswith(_TINY):
        model_type = model_name_or_path[len(_TINY) :]
        overrides = {get_family(model_type).num_experts_attr: num_experts} if num_experts else {}
        return tiny_moe_config(model_type, **overrides)
    try:
        return AutoConfig.from_pretrained(model_name_or_path)
    except OSError:
        return None


def check_run(config) -> None:
    """Everything about a `FederatedMoEConfig` that can be checked without weights: launch, MoE family, targets."""
    from hf_fcmoe.adapters.lora import build_lora_config

    check_launch()
    model_config = model_config_of(config.model_name_or_path, getattr(config, "tiny_num_experts", None))
    if model_config is None:
        return
    family = get_family(model_config)
    build_lora_config(family, config.lora_r, config.lora_alpha, config.lora_targets)
    folder = Path(config.model_name_or_path)
    if folder.is_dir() and not any(next(folder.glob(pattern), None) for pattern in _WEIGHT_FILES):
        raise FileNotFoundError(
            f"model folder {folder} has a config.json but no weights (*.safetensors / *.bin); recipes/<model>/ "
            "folders hold published configs only: set model_name_or_path to the Hub id or a downloaded checkpoint"
        )
