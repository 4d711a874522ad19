"""What crosses the network per round on the Flower engine, in bytes, from shapes alone (meta device).

`python -m hf_fcmoe.federation.flower.wire_size --config RECIPE [--mixtral-8x7b]` prints, per client and
round: the train message (global adapter), the train reply (the update: in full, and for a client that changed
only `--touched` experts of each layer, default top_k, whose other expert slices are not sent), the evaluate
message (the new global and, at most, the residual); sizes are those of the ArrayRecords (tensor bytes plus, per
tensor, its key and NumPy's header), in the adapter's dtype. `--mixtral-8x7b` puts the recipe's LoRA on Mixtral-8x7B's
configuration (transformers' MixtralConfig defaults: 32 layers, 8 experts, hidden 4096, FFN 14336).
"""

from __future__ import annotations

import argparse
import io
from dataclasses import dataclass

import numpy as np
import torch

_NP_DTYPES = {torch.float32: np.float32, torch.bfloat16: np.int16, torch.float16: np.float16, torch.int64: np.int64}


def array_record_bytes(shapes: dict[str, tuple[int, ...]], dtype: torch.dtype) -> int:
    """Bytes `ArrayRecord.count_bytes` counts for tensors of these shapes (key + .npy header + data, per tensor)."""
    total = 0
    descr = np.lib.format.dtype_to_descr(np.dtype(_NP_DTYPES[dtype]))
    for key, shape in shapes.items():
        header = io.BytesIO()
        np.lib.format.write_array_header_1_0(header, {"descr": descr, "fortran_order": False, "shape": tuple(shape)})
        total += len(key) + len(header.getvalue()) + int(np.prod(shape)) * torch.empty((), dtype=dtype).element_size()
    return total


def sliced_reply_shapes(layout, touched: dict[int, int] | int) -> tuple[dict, dict]:
    """Shapes of a reply whose client changed `touched[layer]` (or `touched`) experts of each layer's fused expert
    factors and every other tensor: (tensor shapes, expert-index shapes), as `codec.put_state` sends them."""
    tensors, indices = {}, {}
    for pair in layout.pairs:
        k = touched if isinstance(touched, int) else touched.get(pair.layer, 0)
        for key, shape in ((pair.a_key, pair.a_shape), (pair.b_key, pair.b_shape)):
            if pair.kind != "expert" or pair.num_experts < 2 or k >= pair.num_experts:
                tensors[key] = shape
            elif k > 0:
                per_expert = (pair.rank, pair.in_features) if key == pair.a_key else (pair.out_features, pair.rank)
                tensors[key], indices[key] = (k, *per_expert), (k,)
    return tensors, indices


def sliced_reply_bytes(layout, touched: dict[int, int] | int, dtype: torch.dtype) -> int:
    tensors, indices = sliced_reply_shapes(layout, touched)
    return array_record_bytes(tensors, dtype) + array_record_bytes(indices, torch.int64)


@dataclass
class RoundBytes:
    """Per client and round, in bytes."""

    train_down: int  # global adapter in the train message
    train_up: int  # the client's update
    eval_down: int  # new global in the evaluate message
    residual_max: int  # residual, when every tensor has a conflict (only conflicting tensors are sent)
    raw_state: int  # tensor bytes of one adapter state, no headers
    touched: int = 0  # experts per layer of the sliced reply below
    num_experts: int = 0
    train_up_touched: int = 0  # the update of a client that changed `touched` experts of every layer

    def rows(self, clients: int) -> list[tuple[str, int]]:
        return [
            ("adapter state (tensor bytes)", self.raw_state),
            ("train message down (global)", self.train_down),
            ("train reply up (update, every expert changed)", self.train_up),
            (f"train reply up ({self.touched} of {self.num_experts} experts changed)", self.train_up_touched),
            ("evaluate message down (global)", self.eval_down),
            ("evaluate message down (residual, at most)", self.residual_max),
            (
                f"round total, {clients} clients, at most",
                clients * (self.train_down + self.train_up + self.eval_down + self.residual_max),
            ),
        ]


def round_bytes(
    model_config, lora_config, dtype: torch.dtype = torch.float32, touched: int | None = None
) -> RoundBytes:
    """`touched`: experts per layer a client changed (default: top_k, a client whose tokens used as few experts
    as routing allows); the untouched ones are not sent (expert_slices.py)."""
    from hf_fcmoe.adapters.lora import expert_layout_from_configs

    layout = expert_layout_from_configs(model_config, lora_config)
    shapes = layout.expected_shapes()
    state = array_record_bytes(shapes, dtype)
    raw = sum(int(np.prod(shape)) for shape in shapes.values()) * torch.empty((), dtype=dtype).element_size()
    touched = layout.top_k if touched is None else touched
    return RoundBytes(
        train_down=state,
        train_up=state,
        eval_down=state,
        residual_max=state,
        raw_state=raw,
        touched=touched,
        num_experts=layout.num_experts,
        train_up_touched=sliced_reply_bytes(layout, touched, dtype),
    )


def main() -> None:
    from transformers import MixtralConfig

    from hf_fcmoe.adapters.lora import build_lora_config
    from hf_fcmoe.config import load_config
    from hf_fcmoe.models.families import get_family, tiny_moe_config
    from hf_fcmoe.models.loading import TINY_PREFIX, is_tiny

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="recipe YAML (its LoRA fields and model)")
    parser.add_argument("--mixtral-8x7b", action="store_true", help="the recipe's LoRA on Mixtral-8x7B shapes")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="adapter dtype")
    parser.add_argument("--touched", type=int, default=None, help="experts per layer a client changed (default top_k)")
    args = parser.parse_args()
    config = load_config(args.config)
    if args.mixtral_8x7b:
        model_config, name = MixtralConfig(), "Mixtral-8x7B"
    elif is_tiny(config.model_name_or_path):
        overrides = {}
        if config.tiny_num_experts:
            family = get_family(config.model_name_or_path[len(TINY_PREFIX) :])
            overrides[family.num_experts_attr] = config.tiny_num_experts
        model_config = tiny_moe_config(config.model_name_or_path[len(TINY_PREFIX) :], **overrides)
        name = config.model_name_or_path
    else:
        from transformers import AutoConfig

        model_config, name = AutoConfig.from_pretrained(config.model_name_or_path), config.model_name_or_path
    lora_config = build_lora_config(get_family(model_config), config.lora_r, config.lora_alpha, config.lora_targets)
    sizes = round_bytes(model_config, lora_config, getattr(torch, args.dtype), args.touched)
    print(f"{name}, LoRA r={config.lora_r} on {config.lora_targets}, {args.dtype} adapters, per client and round:")
    for label, value in sizes.rows(config.sampled_per_round):
        print(f"  {label:<45} {value:>15,d} B  ({value / 2**20:,.2f} MiB)")


if __name__ == "__main__":
    main()
