"""hf_fcmoe: conflict-aware federated fine-tuning of Mixture-of-Experts LLMs (FC-MoE) on Hugging Face."""

from hf_fcmoe.adapters import apply_expert_lora, build_lora_config
from hf_fcmoe.aggregation import AggregationHub, AggregationResult, ClientUpdate, UpdateRejected
from hf_fcmoe.callbacks import ExpertUsageCallback
from hf_fcmoe.config import FederatedMoEConfig, load_config
from hf_fcmoe.federation.simulation import SimulationResult, run_simulation
from hf_fcmoe.layout import ExpertLayout, LoraPair
from hf_fcmoe.moe import FAMILIES, MoEFamily, build_tiny_moe, get_family
from hf_fcmoe.trainer import FederatedMoETrainer

__version__ = "0.1.0"

__all__ = [
    "FAMILIES",
    "AggregationHub",
    "AggregationResult",
    "ClientUpdate",
    "ExpertLayout",
    "ExpertUsageCallback",
    "FederatedMoEConfig",
    "FederatedMoETrainer",
    "LoraPair",
    "MoEFamily",
    "SimulationResult",
    "UpdateRejected",
    "apply_expert_lora",
    "build_lora_config",
    "build_tiny_moe",
    "get_family",
    "load_config",
    "run_simulation",
]
