"""hf_fcmoe: conflict-aware federated fine-tuning of Mixture-of-Experts LLMs (FC-MoE) on Hugging Face.

The public names below are imported lazily (PEP 562), as transformers does: `import hf_fcmoe` loads
nothing heavy, and `import hf_fcmoe.aggregation` (pure torch) never pulls in transformers, PEFT or
huggingface_hub on the way.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS: dict[str, str] = {
    "apply_expert_lora": "hf_fcmoe.adapters.lora",
    "build_lora_config": "hf_fcmoe.adapters.lora",
    "expert_layout_from_configs": "hf_fcmoe.adapters.lora",
    "expert_layout_from_peft_model": "hf_fcmoe.adapters.lora",
    "load_adapter_model": "hf_fcmoe.adapters.loading",
    "ExpertLayout": "hf_fcmoe.adapters.layout",
    "LoraPair": "hf_fcmoe.adapters.layout",
    "AggregationHub": "hf_fcmoe.aggregation",
    "AggregationResult": "hf_fcmoe.aggregation",
    "ClientUpdate": "hf_fcmoe.aggregation",
    "UpdateRejected": "hf_fcmoe.aggregation",
    "check_client_id": "hf_fcmoe.aggregation",
    "update_fingerprint": "hf_fcmoe.aggregation",
    "ExpertUsageCallback": "hf_fcmoe.training.callbacks",
    "FederatedMoETrainer": "hf_fcmoe.training.trainer",
    "configure_expert_lora_forward": "hf_fcmoe.training.expert_lora",
    "FederatedMoEConfig": "hf_fcmoe.config",
    "load_config": "hf_fcmoe.config",
    "SimulationResult": "hf_fcmoe.federation.simulation",
    "run_simulation": "hf_fcmoe.federation.simulation",
    "push_run": "hf_fcmoe.hub.publisher",
    "FAMILIES": "hf_fcmoe.models.families",
    "MoEFamily": "hf_fcmoe.models.families",
    "build_tiny_moe": "hf_fcmoe.models.families",
    "get_family": "hf_fcmoe.models.families",
}

__all__ = [
    "AggregationHub",
    "AggregationResult",
    "ClientUpdate",
    "ExpertLayout",
    "ExpertUsageCallback",
    "FAMILIES",
    "FederatedMoEConfig",
    "FederatedMoETrainer",
    "LoraPair",
    "MoEFamily",
    "SimulationResult",
    "UpdateRejected",
    "apply_expert_lora",
    "build_lora_config",
    "build_tiny_moe",
    "check_client_id",
    "configure_expert_lora_forward",
    "expert_layout_from_configs",
    "expert_layout_from_peft_model",
    "get_family",
    "load_adapter_model",
    "load_config",
    "push_run",
    "run_simulation",
    "update_fingerprint",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'hf_fcmoe' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this hook
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


if TYPE_CHECKING:  # static analysers and IDEs see the real imports
    from hf_fcmoe.adapters.layout import ExpertLayout, LoraPair
    from hf_fcmoe.adapters.loading import load_adapter_model
    from hf_fcmoe.adapters.lora import (
        apply_expert_lora,
        build_lora_config,
        expert_layout_from_configs,
        expert_layout_from_peft_model,
    )
    from hf_fcmoe.aggregation import (
        AggregationHub,
        AggregationResult,
        ClientUpdate,
        UpdateRejected,
        check_client_id,
        update_fingerprint,
    )
    from hf_fcmoe.config import FederatedMoEConfig, load_config
    from hf_fcmoe.federation.simulation import SimulationResult, run_simulation
    from hf_fcmoe.hub.publisher import push_run
    from hf_fcmoe.models.families import FAMILIES, MoEFamily, build_tiny_moe, get_family
    from hf_fcmoe.training.callbacks import ExpertUsageCallback
    from hf_fcmoe.training.expert_lora import configure_expert_lora_forward
    from hf_fcmoe.training.trainer import FederatedMoETrainer
