"""Step time of FederatedMoETrainer against a plain transformers.Trainer + PEFT, side by side.

Same tiny MoE, same LoRA config, same tokenized data and collator, same seed; runs alternate
(plain, federated, plain, ...) so drift of the machine hits both alike. Reports the median
seconds per optimizer step of each and their ratio (goal: federated / plain <= 1.05), plus
trl.SFTTrainer (FederatedMoETrainer's base class) to separate TRL's own per-step cost (it logs
token entropy and accuracy every step) from what hf_fcmoe adds (expert counting hooks, FedProx).

    python benchmarks/trainer_overhead.py                 # default: 5 repeats x 30 steps
    python benchmarks/trainer_overhead.py --repeats 2 --steps 5   # smoke run
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import datasets
import torch
from transformers import Trainer, TrainingArguments
from trl import SFTTrainer

from hf_fcmoe.adapters.lora import apply_expert_lora, build_lora_config
from hf_fcmoe.config import FederatedMoEConfig
from hf_fcmoe.data.synthetic import synthetic_domains
from hf_fcmoe.federation.client import ClientWorker
from hf_fcmoe.models.families import build_tiny_moe, get_family
from hf_fcmoe.training.trainer import FederatedMoETrainer


def _fresh_model(hidden: int, layers: int):
    model, tokenizer = build_tiny_moe(
        "mixtral", seed=0, hidden_size=hidden, num_hidden_layers=layers, intermediate_size=2 * hidden
    )
    return apply_expert_lora(model, build_lora_config(get_family(model.config), r=8)), tokenizer


def _time_train(trainer) -> float:
    start = time.perf_counter()
    trainer.train()
    return (time.perf_counter() - start) / trainer.state.global_step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--batch", type=int, default=8)
    args = parser.parse_args()
    torch.set_num_threads(torch.get_num_threads())
    datasets.disable_progress_bars()
    scratch = tempfile.mkdtemp(prefix="bench_overhead_")
    common = dict(
        output_dir=scratch,
        max_steps=args.steps,
        per_device_train_batch_size=args.batch,
        learning_rate=1e-3,
        weight_decay=0.0,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        logging_strategy="no",
        seed=0,
    )
    fed_args = FederatedMoEConfig(**common, max_length=96, router_aux_loss_coef=0.0, activation_checkpointing=False)
    model, tokenizer = _fresh_model(args.hidden, args.layers)
    worker = ClientWorker(model, tokenizer, fed_args)
    splits = worker.prepare(synthetic_domains(args.steps * args.batch), synthetic_domains(8))
    train_rows = splits.train.select_columns(["input_ids"])
    fed_args.dataset_kwargs = {"skip_prepare_dataset": True}

    plain, sft, federated = [], [], []
    for _ in range(args.repeats):
        model, tokenizer = _fresh_model(args.hidden, args.layers)
        plain_trainer = Trainer(
            model=model, args=TrainingArguments(**common), train_dataset=train_rows, data_collator=worker.collator
        )
        plain.append(_time_train(plain_trainer))
        model, tokenizer = _fresh_model(args.hidden, args.layers)
        sft.append(_time_train(SFTTrainer(model, args=fed_args, train_dataset=train_rows, processing_class=tokenizer)))
        model, tokenizer = _fresh_model(args.hidden, args.layers)
        fed_trainer = FederatedMoETrainer(model, args=fed_args, train_dataset=train_rows, processing_class=tokenizer)
        federated.append(_time_train(fed_trainer))
    plain_s, sft_s, fed_s = (statistics.median(times) for times in (plain, sft, federated))
    print(
        f"tiny mixtral hidden={args.hidden} layers={args.layers} experts=4 top-2, batch {args.batch}, "
        f"{args.steps} steps x {args.repeats} repeats, {torch.get_num_threads()} threads"
    )
    print("| trainer | median s/step | ratio |")
    print("|---|---|---|")
    print(f"| transformers.Trainer + PEFT | {plain_s:.4f} | 1.00 |")
    print(f"| trl.SFTTrainer + PEFT (its base class) | {sft_s:.4f} | {sft_s / plain_s:.3f} |")
    print(f"| FederatedMoETrainer | {fed_s:.4f} | {fed_s / plain_s:.3f} |")
    print(f"FederatedMoETrainer / SFTTrainer (what hf_fcmoe itself adds): {fed_s / sft_s:.3f}")


if __name__ == "__main__":
    main()
