"""Which MoE model types of the installed transformers work, and why the others cannot.

`tested_model_types` is every causal-LM model type whose modeling code defines experts (multimodal
wrappers are covered by their ``*_text`` language model). `UNSUPPORTED` names those whose experts PEFT
cannot adapt one LoRA per expert, with the reason (`get_family` raises "not supported because <reason>");
`UNTESTED` names those our tiny configs cannot run yet (so nothing is claimed for them).
`python -m hf_fcmoe.models.family_support` prints the table of the README's "Supported MoE families".
"""

from __future__ import annotations

import sys

from hf_fcmoe.models.discovery import moe_model_types

UNSUPPORTED: dict[str, str] = {
    "dbrx": "its experts are 2D (experts*ffn, hidden) stacks sliced by the parent module outside the wrapped "
    "module's forward, so PEFT can neither fit one LoRA per expert nor apply it in the forward",
    "jetmoe": "its experts are ParallelExperts `input_linear`/`output_linear` (attention is an MoE too), outside "
    "transformers' experts interface",
    "longcat_flash": "it routes to zero-computation experts too: gate_up_proj has experts + zero experts rows "
    "while down_proj has the real experts only",
    "inkling_text": "its router scores the shared experts too ((experts + shared, hidden) router), so router rows "
    "are not one per fused expert",
}

UNTESTED: dict[str, str] = {
    "axk2": "its sparse-attention indexer does not run at test-sized head dimensions",
    "deepseek_v32": "its sparse-attention indexer does not run at test-sized head dimensions",
    "glm_moe_dsa": "its sparse-attention indexer does not run at test-sized head dimensions",
    "deepseek_v4": "its compressed attention does not run at test-sized head dimensions",
    "dots1": "its tiny config does not build (the default config misses a size)",
    "dots3_note_text": "its per_layer_config names layers beyond a tiny stack",
    "gemma4_text": "its per_layer_config names layers beyond a tiny stack",
    "granitemoehybrid": "its Mamba head state must match the model width (no tiny size found)",
    "lfm2_moe": "its default config has no layer_types, which the model requires",
    "qwen4_exp_text": "its default config leaves the indexer sizes unset",
    "zaya": "it supports top-1 routing only and its tiny config does not build",
}


def tested_model_types() -> list[str]:
    """MoE causal-LM model types, without multimodal wrappers whose `<type>_text` model is listed too."""
    types = moe_model_types()
    return [mt for mt in types if f"{mt}_text" not in types and mt not in UNTESTED]


def support_table() -> str:
    """Markdown table: each MoE model type of the installed transformers and whether it works."""
    from hf_fcmoe.models.families import get_family

    rows = ["| model_type | status | experts / router / shared experts |", "|---|---|---|"]
    types = moe_model_types()
    for model_type in types:
        if f"{model_type}_text" in types:
            rows.append(f"| {model_type} | via `{model_type}_text` (multimodal wrapper) | |")
        elif model_type in UNSUPPORTED:
            rows.append(f"| {model_type} | not supported because {UNSUPPORTED[model_type]} | |")
        elif model_type in UNTESTED:
            rows.append(f"| {model_type} | discovered, not tested: {UNTESTED[model_type]} | |")
        else:
            family = get_family(model_type)
            flags = [flag for flag in ("is_transposed", "has_bias") if getattr(family, flag)]
            flags += [] if family.has_gate else ["no gate"]
            shared = ", ".join(family.shared_expert_modules) or "-"
            rows.append(
                f"| {model_type} | tested | `{family.experts_path}` ({', '.join(family.expert_parameters)}"
                f"{'; ' + ', '.join(flags) if flags else ''}) / `{family.router_path}` / {shared} |"
            )
    return "\n".join(rows)


if __name__ == "__main__":
    sys.stdout.write(support_table() + "\n")
