"""Every check a run's settings can fail, done when the config is built: before any data, model or file.

`FederatedMoEConfig.__post_init__` calls `check_run_settings`, so `--aggregation_method fcmo` or
`--learning_rate -0.01` fail in one line before the run writes base_model/, config.yaml, state.json or a
metrics row (they used to fail inside the first round, leaving a run that neither --resume nor a plain
rerun accepted). Checks that need the data or the model (partition sizes, tokenized lengths) run in the
engine before its first write.
"""

from __future__ import annotations

from typing import Any


def _positive(name: str, value: Any) -> None:
    if value is None or not value > 0:
        raise ValueError(f"{name} must be > 0, got {value!r}")


def _non_negative(name: str, value: Any) -> None:
    if value is None or value < 0:
        raise ValueError(f"{name} must be >= 0, got {value!r}")


def _one_of(name: str, value: Any, choices) -> None:
    if value not in choices:
        raise ValueError(f"unknown {name} {value!r}; available: {', '.join(choices)}")


def check_local_training(config) -> None:
    """The TrainingArguments values each client's local round would only reject mid-run (in its optimizer)."""
    _positive("learning_rate", config.learning_rate)
    _non_negative("weight_decay", config.weight_decay)
    _positive("per_device_train_batch_size", config.per_device_train_batch_size)
    _positive("gradient_accumulation_steps", config.gradient_accumulation_steps)
    if config.max_length is not None:
        _positive("max_length", config.max_length)
    _positive("eval_batch_size", config.eval_batch_size)


def check_model_and_adapter(config) -> None:
    from hf_fcmoe.adapters.lora import TARGET_CHOICES
    from hf_fcmoe.models.loading import TINY_PREFIX

    _positive("lora_r", config.lora_r)
    _positive("lora_alpha", config.lora_alpha)
    unknown = sorted(set(config.lora_targets) - set(TARGET_CHOICES))
    if unknown:
        raise ValueError(f"unknown lora_targets {unknown}; choose from {list(TARGET_CHOICES)}")
    if "experts" not in config.lora_targets:
        raise ValueError("lora_targets must include 'experts' (the per-expert adapters are what is federated)")
    if config.model_name_or_path.startswith(TINY_PREFIX):
        from hf_fcmoe.models.discovery import moe_model_types

        # the cheap list (read off transformers' modeling sources): discovering every family's layout here would
        # build dozens of meta models on every config; the chosen family itself is discovered when the run loads it
        _one_of("tiny model type", config.model_name_or_path[len(TINY_PREFIX) :], moe_model_types())
    if config.tiny_num_experts is not None and config.tiny_num_experts < 2:
        raise ValueError(f"tiny_num_experts must be >= 2, got {config.tiny_num_experts}")


def check_data(config) -> None:
    from hf_fcmoe.data.formatting import TASKS
    from hf_fcmoe.data.partition import PARTITIONERS

    _one_of("task", config.task, TASKS)
    _one_of("partition", config.partition, PARTITIONERS)
    _positive("dirichlet_alpha", config.dirichlet_alpha)
    _positive("shards_per_client", config.shards_per_client)
    _non_negative("min_partition_size", config.min_partition_size)
    if not 0 <= config.eval_fraction < 1:
        raise ValueError(f"eval_fraction must be in [0, 1), got {config.eval_fraction}")
    if config.num_examples is not None:
        _positive("num_examples", config.num_examples)
    if config.prompt_template is not None and "{text}" not in config.prompt_template:
        raise ValueError(f"prompt_template must contain '{{text}}', got {config.prompt_template!r}")


def check_aggregation(config) -> None:
    """Method name, its options and server step, exactly as the hub will resolve them."""
    from hf_fcmoe.aggregation.options import resolve_options

    options = dict(config.aggregation_options or {})
    if config.aggregation_method == "fcmoe":
        options.setdefault("retention_lambda", config.retention_lambda)
    try:
        resolve_options(config.aggregation_method, config.server_lr, options)
    except TypeError as error:  # unknown option names
        raise ValueError(f"aggregation_options: {error}") from None
    _non_negative("proximal_mu", config.proximal_mu)
    if config.aggregation_method == "fedprox" and config.proximal_mu <= 0:
        raise ValueError(f"aggregation_method 'fedprox' needs proximal_mu > 0, got {config.proximal_mu}")
    from hf_fcmoe.federation.lambda_choice import check_lambda_grid

    check_lambda_grid(config)


def check_run_settings(config) -> None:
    """All of the above; ValueError with one line naming the first bad value."""
    check_local_training(config)
    check_model_and_adapter(config)
    check_data(config)
    check_aggregation(config)
