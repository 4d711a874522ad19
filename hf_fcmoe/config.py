"""`FederatedMoEConfig`: one dataclass for a whole federated run, as TRL pairs one config with one trainer.

It extends `trl.SFTConfig` (so every TrainingArguments/SFT field sets up each client's local round:
learning_rate, per_device_train_batch_size, max_steps = local steps per round, max_length, ...) with
the model, LoRA, data, federation, aggregation and personalization fields. A recipe YAML is exactly
these fields; an unknown key is an error, not a silent default.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from enum import Enum
from pathlib import Path
from typing import Any, TypeVar

import torch
import yaml
from transformers import HfArgumentParser
from trl import SFTConfig

from hf_fcmoe.adapters.lora import TARGET_CHOICES
from hf_fcmoe.data.federated import DataSpec

T = TypeVar("T")


@dataclass
class FederatedMoEConfig(SFTConfig):
    """Configuration of a federated MoE LoRA fine-tuning run (see field help texts)."""

    # --- model and adapter
    model_name_or_path: str = field(
        default="tiny:mixtral",
        metadata={
            "help": "Base MoE model: a Hub id, a local folder, or 'tiny:<model_type>' for a tiny random-initialised "
            "model built in code (mixtral, qwen2_moe, qwen3_moe, olmoe, phimoe, granitemoe)."
        },
    )
    tiny_num_experts: int | None = field(default=None, metadata={"help": "Experts of a tiny model (default 4)."})
    lora_r: int = field(default=8, metadata={"help": "LoRA rank of every adapted weight (per expert for experts)."})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA alpha (scaling = alpha / r)."})
    lora_targets: list[str] = field(
        default_factory=lambda: ["experts", "router"],
        metadata={"help": f"What gets LoRA: any of {list(TARGET_CHOICES)}; 'experts' is required."},
    )
    # --- data
    dataset_name: str = field(
        default="synthetic_domains",
        metadata={"help": "Bundled source name, local .json/.jsonl/.csv/.parquet file, or Hub dataset id."},
    )
    dataset_config: str | None = field(
        default=None,
        metadata={"help": "Hub dataset config name; for synthetic_domains a comma-separated subset of its domains."},
    )
    dataset_split: str = field(default="train", metadata={"help": "Split to load and partition."})
    num_examples: int | None = field(default=None, metadata={"help": "Subsample the source to this many rows."})
    label_column: str = field(default="label", metadata={"help": "Column used for label/domain skew."})
    task: str = field(
        default="lm", metadata={"help": "lm, or classification (text + label trained as instruction -> label word)."}
    )
    text_column: str | None = field(
        default=None, metadata={"help": "Text column; default: the first of text / prompt / messages present."}
    )
    class_names: list[str] | None = field(
        default=None, metadata={"help": "Label words of a classification task (default: from the data)."}
    )
    prompt_template: str | None = field(
        default=None, metadata={"help": "Classification instruction with {text} (and {labels}); default built in."}
    )
    partition: str = field(
        default="dirichlet", metadata={"help": "Partitioner: iid, dirichlet, natural, quantity, shards."}
    )
    partition_column: str | None = field(
        default=None, metadata={"help": "Column the partition skews on (default: label_column)."}
    )
    shards_per_client: int = field(default=2, metadata={"help": "Labels per client of the 'shards' partition."})
    dirichlet_alpha: float = field(default=0.5, metadata={"help": "Dirichlet concentration (smaller = more skew)."})
    min_partition_size: int = field(default=8, metadata={"help": "Minimum examples per client."})
    eval_fraction: float = field(default=0.2, metadata={"help": "Fraction of each client's rows held out for eval."})
    # --- federation
    num_clients: int = field(default=4, metadata={"help": "Number of clients the data is partitioned over."})
    clients_per_round: int | None = field(
        default=None, metadata={"help": "Clients sampled per round (seeded); default: all clients."}
    )
    num_rounds: int = field(default=3, metadata={"help": "Federated rounds."})
    engine: str = field(default="simulation", metadata={"help": "Federation engine: simulation (in-process)."})
    # --- aggregation
    aggregation_method: str = field(default="fedavg", metadata={"help": "Aggregation method of the hub."})
    server_lr: float = field(default=1.0, metadata={"help": "Server step eta applied to the aggregate (all methods)."})
    aggregation_options: dict[str, Any] = field(
        default_factory=dict, metadata={"help": "Extra keyword options of the aggregation method."}
    )
    retention_lambda: float = field(
        default=0.5, metadata={"help": "FC-MoE local knowledge retention: weight of the kept residual."}
    )
    proximal_mu: float = field(default=0.0, metadata={"help": "FedProx proximal term mu (0 = off)."})
    # --- personalization baselines (federation/personalization.py); None keeps the hub's own (FC-MoE retention)
    personalization: str | None = field(
        default=None,
        metadata={
            "help": "Per-client adapters besides the hub's: finetune (the final global fine-tuned one round per "
            "client), ditto (a personal adapter with a proximal term towards the global), personal_router (experts "
            "federated, each client's router LoRA kept local)."
        },
    )
    personalization_mu: float | None = field(
        default=None, metadata={"help": "Ditto's proximal weight mu in mu/2 ||w_p - w_g||^2 (default 0.1)."}
    )
    eval_batch_size: int = field(default=16, metadata={"help": "Batch size of federated evaluation."})
    overwrite_output_dir: bool = field(
        default=False, metadata={"help": "Start over when output_dir already holds a run (else: error or --resume)."}
    )
    push_to_hub_repo: str | None = field(default=None, metadata={"help": "Hub repo to publish adapters to."})
    # --- local training: TRL turns recomputation on by default, under transformers' current name (setting
    # the deprecated `gradient_checkpointing` alias made transformers warn on every config, i.e. every run)
    activation_checkpointing: bool | None = field(
        default=True,
        metadata={"help": "Recompute activations in backward to save memory (old name: gradient_checkpointing)."},
    )
    gradient_checkpointing: bool | None = field(
        default=None, metadata={"help": "Deprecated alias of activation_checkpointing (transformers 5)."}
    )

    def __post_init__(self):
        if self.bf16 is None:
            self.bf16 = bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
        if not torch.cuda.is_available():
            self.dataloader_pin_memory = False  # nothing to pin for; torch warns on every local round otherwise
        self.report_to = self.report_to if self.report_to not in (None, "all") else "none"
        super().__post_init__()
        self._validate_federation()

    def _validate_federation(self) -> None:
        if self.num_clients <= 0:
            raise ValueError(f"num_clients must be positive, got {self.num_clients}")
        if self.clients_per_round is not None and not 0 < self.clients_per_round <= self.num_clients:
            raise ValueError(
                f"clients_per_round={self.clients_per_round} must be between 1 and num_clients={self.num_clients}"
            )
        if self.num_rounds <= 0:
            raise ValueError(f"num_rounds must be positive, got {self.num_rounds}")
        if self.engine not in ("simulation", "flower"):
            raise ValueError(f"unknown engine {self.engine!r}; available: simulation, flower")
        if self.retention_lambda < 0:
            raise ValueError(f"retention_lambda must be >= 0, got {self.retention_lambda}")

    @property
    def sampled_per_round(self) -> int:
        return self.clients_per_round or self.num_clients

    def data_spec(self) -> DataSpec:
        """The data fields as a `DataSpec` (what `load_federated_data` takes)."""
        names = {f.name for f in fields(DataSpec)}
        values = {name: getattr(self, name) for name in names if hasattr(self, name) and name != "seed"}
        return DataSpec(**values, seed=self.seed)

    def to_yaml_dict(self) -> dict[str, Any]:
        """Every init field, YAML-safe: the resolved recipe of a run (loadable again with `load_config`)."""
        out = {}
        for f in fields(self):
            if not f.init or f.name in _DERIVED_FIELDS:
                continue
            value = getattr(self, f.name)
            if isinstance(value, Enum):
                value = value.value
            if isinstance(value, (str, int, float, bool, list, dict, type(None))):
                out[f.name] = value
        return out


# Fields TrainingArguments fills in from others, or that only make sense for one process.
_DERIVED_FIELDS = {"logging_dir", "hub_token", "local_rank"}


def parse_override_value(text: str) -> Any:
    """`--key value` on the command line: the value is read as YAML (numbers, booleans, lists)."""
    return _as_number(yaml.safe_load(text))


def _as_number(value: Any) -> Any:
    """YAML 1.1 reads ``1e-4`` as a string; read such strings as the float they are."""
    if isinstance(value, str):
        try:
            return float(value) if any(c in value.lower() for c in ".e") and value.strip() else value
        except ValueError:
            return value
    return value


def _coerce_floats(cls: type, values: dict[str, Any]) -> dict[str, Any]:
    float_fields = {f.name for f in fields(cls) if "float" in str(f.type)}
    return {key: _as_number(value) if key in float_fields else value for key, value in values.items()}


def load_yaml_dataclass(cls: type[T], path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> T:
    """Build dataclass `cls` from a YAML mapping plus overrides; unknown keys raise a ValueError naming them."""
    values: dict[str, Any] = {}
    if path is not None:
        values = yaml.safe_load(Path(path).read_text()) or {}
        if not isinstance(values, dict):
            raise ValueError(f"recipe {path} must be a YAML mapping of {cls.__name__} fields")
    values.update(overrides or {})
    known = {f.name for f in fields(cls) if f.init}
    unknown = sorted(set(values) - known)
    if unknown:
        where = f"recipe {path}" if path else "overrides"
        raise ValueError(f"unknown key(s) in {where}: {unknown}")
    (config,) = HfArgumentParser(cls).parse_dict(_coerce_floats(cls, values), allow_extra_keys=False)
    return config


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> FederatedMoEConfig:
    """Read a recipe YAML, apply overrides, and build the config; unknown keys raise a ValueError naming them."""
    return load_yaml_dataclass(FederatedMoEConfig, path, overrides)
