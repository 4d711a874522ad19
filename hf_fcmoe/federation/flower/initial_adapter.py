"""The federation's starting adapter, drawn exactly as the in-process engine draws it.

`draw_initial_adapter` loads the base model, seeds, applies the per-expert LoRA and returns its state:
the same tensors `run_simulation` starts from. The ServerApp calls it unless the run config names an
`initial-adapter` folder; then the server needs no base weights at all (the layout and the fingerprint come
from the model config on the meta device). Make that folder once, on any machine that has the base:

    python -m hf_fcmoe.federation.flower.initial_adapter --config RECIPE --out DIR
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import LoraConfig

from hf_fcmoe.adapters.layout import ExpertLayout
from hf_fcmoe.adapters.lora import (
    apply_expert_lora,
    build_lora_config,
    expert_layout_from_configs,
    expert_layout_from_peft_model,
)
from hf_fcmoe.aggregation.types import State
from hf_fcmoe.config import FederatedMoEConfig
from hf_fcmoe.federation.run_dir import load_adapter_weights, save_adapter_folder
from hf_fcmoe.models.families import get_family
from hf_fcmoe.models.loading import is_tiny, load_base_model, save_base_model
from hf_fcmoe.training.trainer import adapter_state


@dataclass
class ServerAdapterSetup:
    """What the server needs of the base: its config, tokenizer, the LoraConfig, the layout and the first global."""

    model_config: object
    tokenizer: object
    lora_config: LoraConfig
    layout: ExpertLayout
    initial_state: State


def draw_initial_adapter(config: FederatedMoEConfig, tiny_base_dir: Path | None = None) -> ServerAdapterSetup:
    """Load the base once, seed, apply LoRA (as in-process); a tiny base is saved in `tiny_base_dir`."""
    model, tokenizer = load_base_model(
        config.model_name_or_path, seed=config.seed, num_experts=config.tiny_num_experts
    )
    reference = config.model_name_or_path
    if is_tiny(config.model_name_or_path) and tiny_base_dir is not None:
        tiny_base_dir.exists() or save_base_model(model, tokenizer, tiny_base_dir)
        reference = str(tiny_base_dir.resolve())
    lora_config = build_lora_config(
        get_family(model.config), config.lora_r, config.lora_alpha, config.lora_targets, reference
    )
    torch.manual_seed(config.seed)
    peft_model = apply_expert_lora(model, lora_config)
    return ServerAdapterSetup(
        model.config, tokenizer, lora_config, expert_layout_from_peft_model(peft_model), adapter_state(peft_model)
    )


def load_initial_adapter(config: FederatedMoEConfig, folder: Path) -> ServerAdapterSetup:
    """The setup from a saved starting adapter and the base's config and tokenizer only (no weights)."""
    from transformers import AutoConfig, AutoTokenizer

    if is_tiny(config.model_name_or_path):
        raise ValueError("initial-adapter needs a Hub id or local folder as model_name_or_path; tiny bases are built")
    if not (folder / "adapter_model.safetensors").exists():
        raise FileNotFoundError(f"initial-adapter {str(folder)!r} holds no adapter_model.safetensors")
    model_config = AutoConfig.from_pretrained(config.model_name_or_path)
    lora_config = build_lora_config(
        get_family(model_config), config.lora_r, config.lora_alpha, config.lora_targets, config.model_name_or_path
    )
    layout = expert_layout_from_configs(model_config, lora_config)
    state = load_adapter_weights(folder)
    expected = layout.expected_shapes()
    wrong = sorted(
        k for k in set(expected) | set(state) if tuple(state[k].shape if k in state else ()) != expected.get(k)
    )
    if wrong:
        raise ValueError(f"initial-adapter {str(folder)!r} does not match the recipe's LoRA on this base: {wrong[:3]}")
    return ServerAdapterSetup(
        model_config, AutoTokenizer.from_pretrained(config.model_name_or_path), lora_config, layout, state
    )


def main() -> None:
    from hf_fcmoe.config import load_config

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="recipe YAML")
    parser.add_argument("--out", required=True, help="folder for the PEFT adapter")
    args = parser.parse_args()
    setup = draw_initial_adapter(load_config(args.config))
    save_adapter_folder(Path(args.out), setup.initial_state, setup.lora_config)
    print(f"initial adapter: {args.out} (pass initial-adapter='{Path(args.out).resolve()}' in --run-config)")


if __name__ == "__main__":
    main()
