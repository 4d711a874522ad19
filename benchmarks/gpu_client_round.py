"""One client round at real layer sizes on a GPU: tokens/s and peak memory, bf16, random weights.

A few decoder layers with the published dimensions of Mixtral-8x7B or Qwen3-30B-A3B (hidden size, expert
count and width, heads, vocabulary) are built with random weights in bf16, get the recipes' LoRA
(experts + router + attention), and train one local round through `FederatedMoETrainer` on random tokens.
Prints a markdown row per model (tokens/s = trained tokens / wall time of the round; peak = CUDA max
allocated). Needs a CUDA GPU: on CPU it exits 0 after printing why it was skipped.

    python benchmarks/gpu_client_round.py [--layers 4] [--steps 10] [--batch 4] [--seq 512]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
MODELS = ("mixtral-8x7b", "qwen3-30b-a3b")  # recipe folders: published config.json + recipe LoRA


def skip_reason() -> str | None:
    if not torch.cuda.is_available():
        return "no CUDA GPU visible (torch.cuda.is_available() is False)"
    if not torch.cuda.is_bf16_supported():
        return "the GPU does not support bf16"
    return None


def run_model(
    folder: str, layers: int, steps: int, batch: int, seq: int, device: str = "cuda", tiny: bool = False
) -> dict:
    """One client round; `device="cpu", tiny=True` runs the same code path at test sizes (tests/test_recipes.py)."""
    from datasets import Dataset
    from transformers import AutoConfig, AutoModelForCausalLM

    from hf_fcmoe.adapters.lora import apply_expert_lora, build_lora_config
    from hf_fcmoe.config import load_config
    from hf_fcmoe.models.families import get_family
    from hf_fcmoe.models.tokenization import build_byte_tokenizer
    from hf_fcmoe.training.trainer import FederatedMoETrainer

    recipe = load_config(ROOT / "recipes" / folder / "fcmoe.yaml")
    config = AutoConfig.from_pretrained(ROOT / "recipes" / folder)
    if tiny:
        from hf_fcmoe.models.tiny_configs import shrunk_config

        config = shrunk_config(config)
    config.num_hidden_layers = layers
    cuda = device == "cuda"
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16 if cuda else torch.float32)
    family = get_family(config)
    peft_model = apply_expert_lora(
        model, build_lora_config(family, recipe.lora_r, recipe.lora_alpha, recipe.lora_targets)
    )
    tokenizer = build_byte_tokenizer()
    generator = torch.Generator().manual_seed(0)
    rows = torch.randint(3, len(tokenizer), (batch * steps, seq), generator=generator)
    dataset = Dataset.from_dict({"input_ids": rows.tolist()})
    with tempfile.TemporaryDirectory() as out:
        args = load_config(
            ROOT / "recipes" / folder / "fcmoe.yaml",
            overrides=dict(
                output_dir=out, max_steps=steps, per_device_train_batch_size=batch, gradient_accumulation_steps=1,
                max_length=seq, bf16=cuda, use_cpu=not cuda, save_strategy="no", report_to="none", disable_tqdm=True,
                model_name_or_path=str(ROOT / "recipes" / folder),
            ),
        )  # fmt: skip
        trainer = FederatedMoETrainer(peft_model, args=args, train_dataset=dataset, processing_class=tokenizer)
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        update = trainer.train_round()
        if cuda:
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
    return {
        "model": folder,
        "layers": layers,
        "batch x seq": f"{batch} x {seq}",
        "steps": steps,
        "tokens_per_s": round(batch * seq * steps / seconds, 1),
        "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None,
        "train_loss": round(float(update.train_loss), 4),
        "gpu": torch.cuda.get_device_name() if cuda else "cpu (code path only)",
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--models", nargs="*", default=list(MODELS))
    args = parser.parse_args(argv)
    reason = skip_reason()
    if reason:
        print(f"gpu_check skipped: {reason}")
        return 0
    print("| model | layers | batch x seq | steps | tokens/s | peak GiB | train loss | GPU |")
    print("|---|---|---|---|---|---|---|---|")
    for folder in args.models:
        row = run_model(folder, args.layers, args.steps, args.batch, args.seq)
        print("| " + " | ".join(str(v) for v in row.values()) + " |")
        print(json.dumps(row), file=sys.stderr)
        torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
