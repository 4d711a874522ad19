"""Small configs of any MoE model type: the published structure, test-sized numbers.

`shrunk_config` keeps what makes a family itself (which layers are MoE, shared experts, attention kind,
biases) and replaces every size by a small one, so a model builds in milliseconds on CPU. The config is
rebuilt through its class (`from_dict`), so values a config derives in `__post_init__` (deepseek's
``head_dim = qk_rope_head_dim``) follow the new sizes; setting attributes on a built config leaves them
stale, which is what made a tiny deepseek_v3 fail with a rotary size mismatch. The rules are by attribute
name; `TINY_OVERRIDES` is the small table for families whose config needs more.
"""

from __future__ import annotations

from transformers import PretrainedConfig

TINY_HIDDEN = 64
TINY_LAYERS = 2
TINY_EXPERTS = 4
TINY_TOP_K = 2
TINY_VOCAB = 512
MAX_TINY_LAYERS = 8  # hybrid stacks keep one layer of every kind (qwen3_next: 3 linear-attention + 1 full)

_SIZES = {
    "hidden_size": TINY_HIDDEN,
    "d_model": TINY_HIDDEN,
    "num_attention_heads": 4,
    "n_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "kv_channels": 16,
    "max_position_embeddings": 512,
    "max_seq_len": 512,
    # experts and routing
    "num_local_experts": TINY_EXPERTS,
    "num_experts": TINY_EXPERTS,
    "n_routed_experts": TINY_EXPERTS,
    "moe_num_experts": TINY_EXPERTS,
    "num_experts_per_tok": TINY_TOP_K,
    "moe_top_k": TINY_TOP_K,
    "moe_topk": TINY_TOP_K,
    "moe_k": TINY_TOP_K,
    "num_experts_per_token": TINY_TOP_K,
    "n_group": 1,
    "topk_group": 1,
    "num_expert_group": 1,
    # multi-head latent attention (deepseek, glm4_moe_lite, kimi)
    "kv_lora_rank": 16,
    "q_lora_rank": 32,
    "qk_rope_head_dim": 8,
    "qk_nope_head_dim": 8,
    "v_head_dim": 16,
    "index_head_dim": 16,
    "index_n_heads": 2,
    "index_topk": 8,
    # linear attention (qwen3_next, kimi_linear)
    "linear_key_head_dim": 16,
    "linear_value_head_dim": 16,
    "linear_num_key_heads": 2,
    "linear_num_value_heads": 4,
    "linear_head_dim": 16,
    "linear_num_heads": 2,
    # mamba mixers (jamba, nemotron_h, granitemoehybrid)
    "mamba_n_heads": 4,
    "mamba_d_head": 16,
    "mamba_num_heads": 4,
    "mamba_head_dim": 16,
    "mamba_d_state": 8,
    "ssm_state_size": 8,
    "mamba_n_groups": 1,
    "n_groups": 1,
    "mamba_chunk_size": 16,
    "chunk_size": 16,
}
_WIDTH = 32  # every *intermediate_size / *ffn_hidden_size
_LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layers", "num_layers")
_DERIVED = ("qk_head_dim",)
# routing numbers some configs leave None (deepseek_v2 derives top-k elsewhere) and head_dim (derived later)
_SET_WHEN_NONE = ("num_experts_per_tok", "n_group", "topk_group", "head_dim")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _tiny_layer_count(values: dict, layers: int) -> tuple[int, int | None]:
    """Enough layers that every per-layer list keeps each of its kinds (an attention layer in a hybrid)."""
    original = next((values[k] for k in _LAYER_COUNT_KEYS if _is_int(values.get(k))), None)
    if original is None:
        return layers, None
    needed = layers
    for value in values.values():
        if isinstance(value, list) and len(value) == original and value:
            kinds = {repr(v) for v in value}
            prefix = next(i + 1 for i in range(len(value)) if {repr(v) for v in value[: i + 1]} == kinds)
            needed = max(needed, min(prefix, MAX_TINY_LAYERS))
    return min(needed, original), original


def shrink_values(values: dict, layers: int = TINY_LAYERS) -> dict:
    """Test-sized copy of a config dict (recursing into nested configs such as text_config, ffn_config)."""
    out = dict(values)
    count, original = _tiny_layer_count(values, layers)
    for key, value in values.items():
        if key in _SIZES and (_is_int(value) or (value is None and key in _SET_WHEN_NONE)):
            out[key] = _SIZES[key]
        elif (key.endswith("intermediate_size") or key.endswith("ffn_hidden_size")) and _is_int(value) and value > 0:
            out[key] = _WIDTH
        elif key in _DERIVED:
            out.pop(key)
        elif isinstance(value, dict) and key not in ("id2label", "label2id", "rope_parameters", "rope_scaling"):
            out[key] = shrink_values(value, layers)
        elif isinstance(value, list) and original is not None and len(value) == original:
            out[key] = value[:count]
    if "qk_rope_head_dim" in values and "head_dim" in values:
        out["head_dim"] = out["qk_rope_head_dim"]  # MLA rotates only the rope part of each head
    if original is not None:
        for key in _LAYER_COUNT_KEYS:
            if _is_int(values.get(key)):
                out[key] = count
        for key in ("first_k_dense_replace", "num_dense_layers", "moe_layer_start_index"):
            if _is_int(values.get(key)):
                out[key] = min(values[key], count - 1)
        for key in ("decoder_sparse_step", "moe_layer_interval", "interleave_moe_layer_step"):
            if _is_int(values.get(key)) and values[key] > 1:
                out[key] = 1
        if _is_int(values.get("moe_layer_end_index")):
            out["moe_layer_end_index"] = count - 1
        for key in ("mlp_only_layers",):
            if isinstance(values.get(key), list):
                out[key] = [i for i in values[key] if i < count - 1]
    if _is_int(values.get("vocab_size")):
        out["vocab_size"] = min(values["vocab_size"], TINY_VOCAB)
        for key in ("pad_token_id", "bos_token_id", "eos_token_id"):
            if _is_int(values.get(key)) and values[key] >= out["vocab_size"]:
                out[key] = out["vocab_size"] - 1
    if "tie_word_embeddings" in values:
        out["tie_word_embeddings"] = False
    return out


def shrunk_config(config: PretrainedConfig, layers: int = TINY_LAYERS, **overrides) -> PretrainedConfig:
    """A config of the same class with test-sized numbers and the same structure (see module docstring)."""
    values = shrink_values(config.to_dict(), layers)
    values.update(TINY_OVERRIDES.get(config.model_type, {}))
    values.update(overrides)
    return type(config).from_dict(values)


# What the name rules above cannot get right, per model type.
TINY_OVERRIDES: dict[str, dict] = {}
