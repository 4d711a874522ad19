"""Send only what changed: an adapter state relative to a reference the receiver already holds, per expert.

In transformers 5.x the experts of a layer are one fused parameter, and PEFT's `target_parameters` LoRA factors
hold every expert of that layer in one tensor (A: contiguous row blocks, B: strided columns; adapters/layout.py).
A client's reply differs from the global it started from only in what training moved: an expert that routed no
token gets no gradient, so with weight decay 0 and no retained residual in it, its slices come back bit for bit
the global's. Those slices are left out; the receiver, who sent that global, puts them back.

The choice is made by comparing bit patterns, never by trusting expert counts: whatever moved a slice (weight
decay, a proximal term, a retained residual, a method that trains every expert) gets it sent, so reassembly is
exact by construction. Pure torch (the server imports it without transformers or PEFT).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from hf_fcmoe.adapters.layout import ExpertLayout, split_expert_a, split_expert_b

State = dict[str, torch.Tensor]
_INT_OF_SIZE = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _bits(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor's bit pattern as integers (so -0.0 != 0.0 and NaN == the same NaN)."""
    return tensor.view(_INT_OF_SIZE[tensor.element_size()])


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(_bits(a), _bits(b))


def _split(tensor: torch.Tensor, factor: str, num_experts: int) -> torch.Tensor:
    """(E, ...) per-expert view of a fused LoRA factor (writes through to `tensor`)."""
    return split_expert_a(tensor, num_experts) if factor == "a" else split_expert_b(tensor, num_experts)


@dataclass
class PackedState:
    """What goes on the wire: whole tensors, per-expert slices (with their expert indices), keys left out."""

    tensors: State = field(default_factory=dict)  # whole tensors, or (k, ...) stacks of the slices listed in `experts`
    experts: dict[str, torch.Tensor] = field(default_factory=dict)  # key -> int64 indices of the slices sent
    factors: dict[str, tuple[str, int]] = field(default_factory=dict)  # sliced key -> ("a" | "b", num_experts)


def _pair(layout: ExpertLayout | None, key: str):
    if layout is None:
        return None
    try:
        return layout.pair_of(key)
    except KeyError:
        return None


def pack_changed(state: State, reference: State, layout: ExpertLayout | None) -> PackedState:
    """`state` relative to `reference`: tensors equal to the reference are left out, and of a fused expert factor
    only the experts whose slices differ are sent (the whole tensor when every expert changed)."""
    if set(state) != set(reference):
        raise ValueError(f"state and reference differ in keys: {sorted(set(state) ^ set(reference))[:3]}")
    packed = PackedState()
    for key, tensor in state.items():
        ref = reference[key]
        if same_bits(tensor, ref):
            continue
        pair = _pair(layout, key)
        if pair is None or pair.kind != "expert" or pair.num_experts < 2 or tensor.dtype != ref.dtype:
            packed.tensors[key] = tensor
            continue
        factor = "a" if key == pair.a_key else "b"
        mine, theirs = _split(tensor, factor, pair.num_experts), _split(ref, factor, pair.num_experts)
        changed = (_bits(mine) != _bits(theirs)).flatten(1).any(dim=1).nonzero().flatten()
        if len(changed) == pair.num_experts:
            packed.tensors[key] = tensor
            continue
        packed.tensors[key] = mine[changed].contiguous()
        packed.experts[key] = changed.to(torch.int64)
        packed.factors[key] = (factor, pair.num_experts)
    return packed


def unpack_changed(packed: PackedState, reference: State) -> State:
    """The full state back, bit for bit: the reference, overwritten by the tensors and expert slices sent.

    Raises ValueError on anything that does not fit the reference (unknown key, shape, expert index)."""
    unknown = sorted(set(packed.tensors) - set(reference))
    if unknown:
        raise ValueError(f"sent tensors the reference does not have: {unknown[:3]}")
    state = {}
    for key, ref in reference.items():
        if key not in packed.tensors:
            state[key] = ref.clone()
            continue
        sent = packed.tensors[key]
        if key not in packed.experts:
            if sent.shape != ref.shape:
                raise ValueError(f"{key}: sent shape {tuple(sent.shape)}, expected {tuple(ref.shape)}")
            state[key] = sent
            continue
        factor, num_experts = packed.factors[key]
        index = packed.experts[key]
        full = ref.to(sent.dtype).clone()  # a zero reference (residuals) may come in another dtype
        view = _split(full, factor, num_experts)
        valid = index.dtype == torch.int64 and index.dim() == 1 and len(index) == len(set(index.tolist()))
        if not valid or (len(index) and (int(index.min()) < 0 or int(index.max()) >= num_experts)):
            raise ValueError(f"{key}: bad expert indices {index.tolist()[:8]} for {num_experts} experts")
        if sent.shape != (len(index), *view.shape[1:]):
            raise ValueError(f"{key}: sent slices {tuple(sent.shape)} do not fit {len(index)} of {tuple(view.shape)}")
        view[index] = sent
        state[key] = full
    return state
