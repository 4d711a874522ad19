"""`FederatedMoEConfig`: one dataclass for a whole federated run, as TRL pairs one config with one trainer.

It extends `trl.SFTConfig` (so every TrainingArguments/SFT field sets up each client's local round:
learning_rate, per_device_train_batch_size, max_steps = local steps per round, max_length, ...) with
the model, LoRA, data, federation, aggregation and personalization fields. A recipe YAML is exactly
these fields; an unknown key is an error, not a silent default.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from enum import Enum
from pathlib import Path
from typing import Any, TypeVar

import torch
import yaml
from transformers import HfArgumentParser
from trl import SFTConfig

from hf_fcmoe.adapters.lora import TARGET_CHOICES
from hf_fcmoe.aggregation.options import METHODS
from hf_fcmoe.config_checks import check_run_settings
from hf_fcmoe.config_fields import check_known_keys, check_value_types, float_kind, read_yaml_mapping, resolved_types
from hf_fcmoe.data.federated import DataSpec
from hf_fcmoe.training.expert_lora import EXPERT_LORA_FORWARDS

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
    engine: str = field(
        default="simulation",
        metadata={
            "help": "Federation engine: simulation (in-process, `hf-fcmoe simulate`) or flower (a Flower deployment: "
            "`flwr run recipes/flower`; `hf-fcmoe simulate` refuses it)."
        },
    )
    # --- aggregation
    aggregation_method: str = field(
        default="fedavg", metadata={"help": f"Aggregation method of the hub: one of {', '.join(METHODS)}."}
    )
    server_lr: float = field(default=1.0, metadata={"help": "Server step eta applied to the aggregate (all methods)."})
    aggregation_options: dict[str, Any] = field(
        default_factory=dict,
        metadata={"help": "Extra keyword options of the aggregation method (see AggregationHub; unknown ones fail)."},
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
    # --- retention lambda per client (federation/lambda_choice.py)
    retention_lambda_grid: list[float] | None = field(
        default=None,
        metadata={
            "help": "FC-MoE retention with lambda chosen per client: every round each client's personalized adapter "
            "(and next start) is global + lambda * residual with the lambda of this grid (e.g. [0, 0.25, 0.5, 1]) "
            "that has the lowest loss on a validation slice held out from its own train split, never on the eval "
            "split the report scores; replaces retention_lambda (which must stay > 0). None: retention_lambda for all."
        },
    )
    retention_validation_fraction: float | None = field(
        default=None,
        metadata={
            "help": "Share of each client's train rows held out (never trained on) to choose its lambda; default "
            "0.1, only with retention_lambda_grid."
        },
    )
    eval_batch_size: int = field(default=16, metadata={"help": "Batch size of federated evaluation."})
    overwrite_output_dir: bool = field(
        default=False, metadata={"help": "Start over when output_dir already holds a run (else: error or --resume)."}
    )
    # --- publishing (TrainingArguments' own push_to_hub, hub_model_id, hub_private_repo, hub_strategy, hub_token
    # publish the federation's adapters, never a client's local round; see hf_fcmoe/hub/)
    hub_push_clients: list[str] = field(
        default_factory=list,
        metadata={
            "help": "Personalized adapters to push with push_to_hub: client ids, or ['all']; default none "
            "(they are client knowledge)."
        },
    )
    hub_personalized_repo_id: str | None = field(
        default=None,
        metadata={
            "help": "Push each personalized adapter to its own repo, e.g. 'org/name-{client_id}' (else: a branch)"
        },
    )
    # --- reliability and privacy (hf_fcmoe.federation.faults, hf_fcmoe.federation.privacy)
    max_client_examples: int | None = field(
        default=None, metadata={"help": "Cap on the num_examples any client may claim (besides its declared size)."}
    )
    client_round_timeout: float | None = field(
        default=None,
        metadata={"help": "Seconds a client's local round may take; checked at each step end, then it is dropped."},
    )
    min_clients_per_round: int = field(
        default=1, metadata={"help": "Fewest clients that must finish (and be accepted) for a round to count."}
    )
    on_too_few_clients: str = field(
        default="stop", metadata={"help": "Below min_clients_per_round: 'retry' the failed clients, or 'stop'."}
    )
    round_retries: int = field(default=2, metadata={"help": "Retries of failed clients (on_too_few_clients=retry)."})
    dp_noise_multiplier: float | None = field(
        default=None, metadata={"help": "Client-side DP: Gaussian noise std / dp_clip_norm (None: no DP)."}
    )
    dp_clip_norm: float = field(default=1.0, metadata={"help": "Client-side DP: L2 clip of each client's update."})
    dp_delta: float = field(default=1e-5, metadata={"help": "Client-side DP: the delta of the reported epsilon."})
    # --- local training: TRL turns recomputation on by default, under transformers' current name (setting
    # the deprecated `gradient_checkpointing` alias made transformers warn on every config, i.e. every run)
    activation_checkpointing: bool | None = field(
        default=True,
        metadata={"help": "Recompute activations in backward to save memory (old name: gradient_checkpointing)."},
    )
    gradient_checkpointing: bool | None = field(
        default=None, metadata={"help": "Deprecated alias of activation_checkpointing (transformers 5)."}
    )
    # --- expert LoRA forward
    expert_lora_forward: str = field(
        default="routed",
        metadata={
            "help": "How LoRA on fused experts runs: 'routed' applies each expert's adapter to its routed tokens "
            "only (same PEFT adapter, no weight-sized tensors; falls back to 'peft' with one log line where it "
            "cannot be exact), 'peft' uses PEFT's ParamWrapper (materialises W + delta per expert every step)."
        },
    )

    def __post_init__(self):
        # --- launch: CPU runs under `accelerate launch` (cpu.yaml, multi_cpu.yaml) train as gloo DDP ranks without
        # repeating `--use_cpu true`: the single-process launcher exports ACCELERATE_USE_CPU, the multi-process one
        # only WORLD_SIZE (on a machine without CUDA several processes can only be CPU ranks)
        several_cpu_ranks = int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()
        if several_cpu_ranks or os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes"):
            self.use_cpu = True
        if self.bf16 is None:
            self.bf16 = bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
        if not torch.cuda.is_available():
            self.dataloader_pin_memory = False  # nothing to pin for; torch warns on every local round otherwise
        self.report_to = self.report_to if self.report_to not in (None, "all") else "none"
        if self.ddp_find_unused_parameters is None:
            # every LoRA tensor gets a gradient on both expert forwards (PEFT's ParamWrapper builds every expert's
            # delta; the routed one slices each fused factor tensor): transformers' default for a PeftModel (True)
            # only costs a graph walk and a DDP warning. phimoe's router LoRA gets a zero gradient (a tensor, not
            # None) from every token whose runner-up expert lies outside its SparseMixer jitter band: still reduced.
            self.ddp_find_unused_parameters = False
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
        if self.expert_lora_forward not in EXPERT_LORA_FORWARDS:
            raise ValueError(
                f"expert_lora_forward={self.expert_lora_forward!r}; choose from {list(EXPERT_LORA_FORWARDS)}"
            )
        self._validate_hub()
        self._validate_reliability()
        check_run_settings(self)  # every other value, before a run writes anything (config_checks.py)

    def _validate_hub(self) -> None:
        if not self.push_to_hub:
            return
        strategy = getattr(self.hub_strategy, "value", self.hub_strategy)
        if strategy not in ("end", "every_save"):
            raise ValueError(
                f"hub_strategy {strategy!r} is not supported by a federation: use 'end' (after the last round) or "
                "'every_save' (after every round, tagged round-<t>)"
            )
        if not self.hub_model_id:
            raise ValueError("push_to_hub needs hub_model_id (the Hub repo ORG/NAME of the global adapter)")
        from hf_fcmoe.hub.plan import check_repo_id, personalized_repo

        check_repo_id(self.hub_model_id, "hub_model_id")
        if self.hub_personalized_repo_id:
            personalized_repo(self.hub_personalized_repo_id, "x")

    def _validate_reliability(self) -> None:
        if self.max_client_examples is not None and self.max_client_examples <= 0:
            raise ValueError(f"max_client_examples must be positive or null, got {self.max_client_examples}")
        if self.client_round_timeout is not None and not self.client_round_timeout > 0:
            raise ValueError(f"client_round_timeout must be positive seconds or null, got {self.client_round_timeout}")
        if not 1 <= self.min_clients_per_round <= self.sampled_per_round:
            raise ValueError(
                f"min_clients_per_round={self.min_clients_per_round} must be between 1 and the clients sampled "
                f"per round ({self.sampled_per_round})"
            )
        if self.on_too_few_clients not in ("retry", "stop"):
            raise ValueError(f"on_too_few_clients must be 'retry' or 'stop', got {self.on_too_few_clients!r}")
        if self.round_retries < 0:
            raise ValueError(f"round_retries must be >= 0, got {self.round_retries}")
        if self.dp_noise_multiplier is not None and not self.dp_noise_multiplier > 0:
            raise ValueError(f"dp_noise_multiplier must be positive or null, got {self.dp_noise_multiplier}")
        if not self.dp_clip_norm > 0 or not 0 < self.dp_delta < 1:
            raise ValueError(f"dp_clip_norm must be > 0, dp_delta in (0, 1); got {self.dp_clip_norm}, {self.dp_delta}")

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
    try:
        return _as_number(yaml.safe_load(text))
    except yaml.YAMLError as error:
        problem = getattr(error, "problem", None) or type(error).__name__
        raise ValueError(f"command-line value {text!r} is not valid YAML ({problem}); quote it") from None


def _as_number(value: Any) -> Any:
    """YAML 1.1 reads ``1e-4`` as a string; read such strings as the float they are."""
    if isinstance(value, str):
        try:
            return float(value) if any(c in value.lower() for c in ".e") and value.strip() else value
        except ValueError:
            return value
    return value


def _as_float(value: Any) -> Any:
    """An integer given to a float field, as the float `HfArgumentParser` makes of it on a command line.

    `parse_dict` does not convert, and TRL copies `router_aux_loss_coef` into the model's strictly typed config:
    ``router_aux_loss_coef: 0`` stayed an int there and failed inside `SFTTrainer`.
    """
    value = _as_number(value)
    return float(value) if isinstance(value, int) and not isinstance(value, bool) else value


def _coerce_floats(cls: type, values: dict[str, Any]) -> dict[str, Any]:
    hints = resolved_types(cls)
    coerced = {}
    for key, value in values.items():
        kind = float_kind(hints.get(key))
        if kind == "float":
            value = _as_float(value)
        elif kind == "list[float]" and isinstance(value, (list, tuple)):
            value = [_as_float(item) for item in value]
        elif "float" in str(hints.get(key)):  # unions with other types: only the YAML 1.1 exponent strings
            value = _as_number(value)
        coerced[key] = value
    return coerced


def load_yaml_dataclass(
    cls: type[T],
    path: str | Path | None = None,
    overrides: dict[str, Any] | None = None,
    *,
    override_prefix: str = "--",
) -> T:
    """Build dataclass `cls` from a YAML mapping plus overrides (command-line ``--key value``).

    A bad recipe is one ValueError line: YAML syntax (with line and column), an unknown key (where it came from
    and the closest field name), or a value of the wrong type (``--num_rounds abc``).
    """
    values = read_yaml_mapping(path, cls.__name__) if path is not None else {}
    check_known_keys(cls, values, f"recipe {path}")
    overrides = dict(overrides or {})
    check_known_keys(cls, overrides, "the command line", prefix=override_prefix)
    where = {key: f"recipe {path}" for key in values}
    where.update({key: f"command line {override_prefix}{key}" for key in overrides})
    values.update(overrides)
    values = _coerce_floats(cls, values)
    check_value_types(cls, values, where)
    (config,) = HfArgumentParser(cls).parse_dict(values, allow_extra_keys=False)
    return config


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> FederatedMoEConfig:
    """Read a recipe YAML, apply overrides, and build the config; unknown keys raise a ValueError naming them."""
    return load_yaml_dataclass(FederatedMoEConfig, path, overrides)
