"""Pretrain a tiny MoE base centrally, offline, so its experts specialise before federated LoRA.

A random-initialised MoE routes every domain alike, so same-indexed experts are not specialised and
client updates rarely conflict: a federated benchmark on it measures nothing about conflict-aware
aggregation. `pretrain_base` trains a small Mixtral-style model (all weights, with the router
load-balancing loss on so experts stay in use) on a mixture of bundled corpora, saves it as a normal
`from_pretrained` folder, and records its routing specialisation (`routing.json`) on the pretraining
domains and on any probe domains (e.g. the federated tasks that are new to it).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from datasets import Dataset, concatenate_datasets
from transformers import AutoModelForCausalLM, DataCollatorForLanguageModeling, Trainer, TrainingArguments

from hf_fcmoe.data.sources import load_source
from hf_fcmoe.metrics.loss import eval_loss
from hf_fcmoe.metrics.routing_probe import routing_specialisation, texts_by_domain
from hf_fcmoe.models.families import get_family, tiny_moe_config
from hf_fcmoe.models.tokenization import build_byte_tokenizer


@dataclass
class PretrainConfig:
    """A tiny MoE base: architecture, the corpus mixture, and the central training run."""

    output_dir: str = field(metadata={"help": "Folder the base is saved to (reused when it is already complete)."})
    model_type: str = field(default="mixtral", metadata={"help": "MoE family of the base."})
    hidden_size: int = field(default=128, metadata={"help": "Hidden size."})
    intermediate_size: int = field(default=128, metadata={"help": "Per-expert MLP size."})
    num_hidden_layers: int = field(default=4, metadata={"help": "Decoder layers."})
    num_attention_heads: int = field(default=4, metadata={"help": "Attention heads."})
    num_experts: int = field(default=8, metadata={"help": "Experts per layer."})
    top_k: int = field(default=2, metadata={"help": "Experts per token."})
    router_aux_loss_coef: float = field(
        default=0.001, metadata={"help": "Load-balancing loss weight (kept on; Mixtral default)."}
    )
    corpora: list[str] = field(
        default_factory=lambda: ["synthetic_domains:addition,reverse,upper,repeat", "chatterbot_corpus", "human_eval"],
        metadata={"help": "Pretraining sources, 'name' or 'name:config'; every row keeps its label as its domain."},
    )
    examples_per_corpus: int = field(default=2000, metadata={"help": "Rows drawn from each source (at most)."})
    probe_domains: str | None = field(
        default="sort,count,multiply,vowels",
        metadata={"help": "synthetic_domains config whose routing is also measured (tasks new to the base)."},
    )
    max_length: int = field(default=96, metadata={"help": "Tokens per training sequence."})
    max_steps: int = field(default=1200, metadata={"help": "Optimizer steps."})
    per_device_train_batch_size: int = field(default=16, metadata={"help": "Sequences per step."})
    learning_rate: float = field(default=3e-3, metadata={"help": "Peak learning rate (cosine decay)."})
    seed: int = field(default=0, metadata={"help": "Seed of data sampling and initialisation."})


def _domain_rows(spec: str, limit: int, seed: int) -> Dataset:
    name, _, config = spec.partition(":")
    data = load_source(name, config or None, num_examples=None, seed=seed)
    data = data.shuffle(seed=seed).select(range(min(limit, len(data))))
    labels = [f"{name}/{label}" if name != "synthetic_domains" else str(label) for label in data["label"]]
    return Dataset.from_dict({"text": data["text"], "domain": labels})


def _is_complete(path: Path, config: PretrainConfig) -> bool:
    recorded = path / "pretrain_config.json"
    if not (recorded.exists() and (path / "routing.json").exists()):
        return False
    # where the folder lives is not part of what was trained: a copied or moved base stays reusable
    recorded_config, wanted = json.loads(recorded.read_text()), asdict(config)
    recorded_config.pop("output_dir", None)
    wanted.pop("output_dir")
    return recorded_config == wanted


def pretrain_base(config: PretrainConfig, force: bool = False) -> Path:
    """Train (or reuse) the base described by `config`; returns its folder (loadable with from_pretrained)."""
    out = Path(config.output_dir)
    if not force and _is_complete(out, config):
        return out
    tokenizer = build_byte_tokenizer()
    family = get_family(config.model_type)
    model_config = tiny_moe_config(
        config.model_type,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads,
        num_key_value_heads=max(1, config.num_attention_heads // 2),
        **{family.num_experts_attr: config.num_experts, "num_experts_per_tok": config.top_k},
        router_aux_loss_coef=config.router_aux_loss_coef,
        output_router_logits=True,
    )
    torch.manual_seed(config.seed)
    model = AutoModelForCausalLM.from_config(model_config)
    data = concatenate_datasets([_domain_rows(s, config.examples_per_corpus, config.seed) for s in config.corpora])
    split = data.shuffle(seed=config.seed).train_test_split(test_size=0.05, seed=config.seed)
    routing_before = _routing_report(model, tokenizer, split["test"], config)
    tokenized = split.map(
        lambda rows: tokenizer(rows["text"], truncation=True, max_length=config.max_length),
        batched=True,
        remove_columns=["text", "domain"],
    )
    collator = DataCollatorForLanguageModeling(tokenizer, mlm=False)
    args = TrainingArguments(
        output_dir=str(out / "trainer"),
        max_steps=config.max_steps,
        per_device_train_batch_size=config.per_device_train_batch_size,
        learning_rate=config.learning_rate,
        lr_scheduler_type="cosine",
        warmup_steps=max(1, config.max_steps // 20),
        weight_decay=0.01,
        logging_steps=max(1, config.max_steps // 10),
        save_strategy="no",
        report_to="none",
        seed=config.seed,
        use_cpu=not torch.cuda.is_available(),
        disable_tqdm=False,
    )
    Trainer(model=model, args=args, train_dataset=tokenized["train"], data_collator=collator).train()
    loss = eval_loss(model, tokenized["test"], collator)
    model.config.output_router_logits = False  # fine-tuning and eval default to the plain LM loss
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    report = {
        "held_out_loss": loss,
        "held_out_perplexity": math.exp(loss),
        "routing_before": routing_before,
        "routing_after": _routing_report(model, tokenizer, split["test"], config),
    }
    (out / "routing.json").write_text(json.dumps(report, indent=2))
    (out / "pretrain_config.json").write_text(json.dumps(asdict(config), indent=2))
    return out


def _routing_report(model, tokenizer, held_out: Dataset, config: PretrainConfig) -> dict:
    """Specialisation on the pretraining domains (held-out rows) and on the probe (new) domains."""
    held_out_texts = texts_by_domain(held_out["text"], held_out["domain"], 64)
    report = {"pretraining_domains": routing_specialisation(model, tokenizer, held_out_texts)}
    if config.probe_domains:
        rows = _domain_rows(f"synthetic_domains:{config.probe_domains}", 400, config.seed + 1)
        probe_texts = texts_by_domain(rows["text"], rows["domain"], 100)
        report["probe_domains"] = routing_specialisation(model, tokenizer, probe_texts)
    return report
