"""Adapter size, trainable parameters and GPU memory per client of every big-model recipe, from configs alone.

Each `recipes/<model>/` folder holds the published `config.json` (no weights) and its fcmoe/fedavg recipes.
The model is built on the meta device, the recipe's LoRA is attached, and the numbers are counted off the
result; the memory estimate per client (one process holding the whole model) is

- weights: base parameters x 2 bytes (bf16);
- adapter training: trainable parameters x 16 bytes (fp32 LoRA weights 4 + gradients 4 + AdamW moments 8);
- activations with activation checkpointing: one bf16 hidden state per layer per token (L x b x s x h x 2), the
  live set of the one layer being recomputed (b x s x (8h + 3 k I) x 2: attention projections and norms, and
  gate/up/act of the k routed experts per token), fp32 logits and their gradient (b x s x vocab x 8);
- PEFT's ParamWrapper materialises W + delta of every fused expert parameter of the running layer, and a
  weight-sized gradient in backward: 3 x one layer's expert bytes.

With fsdp.yaml / deepspeed_zero3.yaml over N GPUs the weights term divides by N. Run
``python -m hf_fcmoe.models.recipe_report`` for the table in recipes/README.md.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

from transformers import AutoConfig

from hf_fcmoe.adapters.lora import _get_peft_model, build_lora_config, expert_layout_from_peft_model
from hf_fcmoe.config import load_config
from hf_fcmoe.models.discovery import build_on_meta, read_attr
from hf_fcmoe.models.families import get_family

RECIPES = Path(__file__).resolve().parents[2] / "recipes"
GB = 1024**3


@dataclass(frozen=True)
class RecipeNumbers:
    """What one big-model recipe costs per client."""

    folder: str
    model: str
    model_type: str
    parameters: int
    expert_fraction: float
    trainable: int
    adapter_bytes: int
    weights_gb: float
    adapter_training_gb: float
    activations_gb: float
    expert_transient_gb: float

    @property
    def total_gb(self) -> float:
        return self.weights_gb + self.adapter_training_gb + self.activations_gb + self.expert_transient_gb


def big_model_folders() -> list[Path]:
    """recipes/<model>/ folders that carry a published config.json."""
    return sorted(path.parent for path in RECIPES.glob("*/config.json"))


def recipe_numbers(folder: Path, recipe: str = "fcmoe.yaml") -> RecipeNumbers:
    """Build the recipe's model on the meta device with its LoRA attached and count."""
    run = load_config(folder / recipe)
    model_config = AutoConfig.from_pretrained(folder)
    family = get_family(model_config)
    lora_config = build_lora_config(family, run.lora_r, run.lora_alpha, run.lora_targets)
    model = build_on_meta(model_config)
    parameters = sum(p.numel() for p in model.parameters())
    expert_names = {f".{family.experts_path}.{name}" for name in family.expert_parameters}
    expert_params = sum(p.numel() for n, p in model.named_parameters() if any(n.endswith(e) for e in expert_names))
    peft_model = _get_peft_model(model, lora_config)
    layout = expert_layout_from_peft_model(peft_model)
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    adapter_bytes = sum(
        4 * (pair.a_shape[0] * pair.a_shape[1] + pair.b_shape[0] * pair.b_shape[1]) for pair in layout.pairs
    )
    moe_layers = max(1, len({pair.layer for pair in layout.by_kind("expert")}))
    hidden, layers = int(model_config.hidden_size), int(model_config.num_hidden_layers)
    tokens = run.per_device_train_batch_size * run.max_length
    expert_width = _expert_width(model_config)
    top_k = family.top_k(model_config)
    vocab = int(model_config.vocab_size)
    activations = layers * tokens * hidden * 2 + tokens * (8 * hidden + 3 * top_k * expert_width) * 2
    activations += tokens * vocab * 8
    return RecipeNumbers(
        folder=folder.name,
        model=run.model_name_or_path,
        model_type=model_config.model_type,
        parameters=parameters,
        expert_fraction=expert_params / parameters,
        trainable=trainable,
        adapter_bytes=adapter_bytes,
        weights_gb=parameters * 2 / GB,
        adapter_training_gb=trainable * 16 / GB,
        activations_gb=activations / GB,
        expert_transient_gb=3 * (expert_params / moe_layers) * 2 / GB,
    )


def _expert_width(config) -> int:
    for attr in ("moe_intermediate_size", "intermediate_size", "ffn_config.ffn_hidden_size"):
        value = read_attr(config, attr)
        if isinstance(value, int):
            return value
    raise ValueError(f"no expert width in the {config.model_type} config")


def report_table(numbers: list[RecipeNumbers] | None = None) -> str:
    """Markdown table of every big-model recipe (recipes/README.md)."""
    numbers = [recipe_numbers(folder) for folder in big_model_folders()] if numbers is None else numbers
    rows = [
        "| recipe | model | params | experts' share | trainable (LoRA) | adapter fp32 | weights bf16 | "
        "adapter training | activations | expert W+delta | total per client |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for n in numbers:
        rows.append(
            f"| {n.folder} | `{n.model}` ({n.model_type}) | {n.parameters / 1e9:.2f} B | {n.expert_fraction:.0%} | "
            f"{n.trainable / 1e6:.1f} M | {n.adapter_bytes / 2**20:.0f} MiB | {n.weights_gb:.1f} GiB | "
            f"{n.adapter_training_gb:.1f} GiB | {n.activations_gb:.1f} GiB | {n.expert_transient_gb:.1f} GiB | "
            f"**{n.total_gb:.1f} GiB** |"
        )
    return "\n".join(rows)


if __name__ == "__main__":
    sys.stdout.write(report_table() + "\n")
