"""Where every LoRA tensor of an MoE adapter lives, and how to cut it per expert.

This module is pure torch: the aggregation server imports it without transformers or PEFT, and
never needs base weights. It never imports the PEFT-facing side either: `hf_fcmoe.adapters.lora`
builds an `ExpertLayout` (`expert_layout_from_configs`, `expert_layout_from_peft_model`); everything
here only reads that description.

PEFT's layout for a fused expert parameter (E experts, rank r), as in `ParamWrapper.get_delta_weight`:
``lora_A`` is (E*r, in) in contiguous blocks ``A[e*r:(e+1)*r]``; ``lora_B`` is (out, E*r) strided,
``B[:, e::E]`` (column ``k*E + e`` is rank ``k`` of expert ``e``); delta_e = scaling * B_e @ A_e.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal

import torch

Kind = Literal["expert", "router", "dense"]

_LAYER_RE = re.compile(r"\.layers\.(\d+)\.")


def layer_index(key: str) -> int | None:
    """Decoder layer index parsed from a state-dict key, or None for tensors outside the layer stack."""
    match = _LAYER_RE.search(key)
    return int(match.group(1)) if match else None


def split_expert_a(lora_a: torch.Tensor, num_experts: int) -> torch.Tensor:
    """(E*r, in) -> (E, r, in): expert e's A factor is a contiguous row block (a view, no copy)."""
    return lora_a.reshape(num_experts, -1, lora_a.shape[-1])


def split_expert_b(lora_b: torch.Tensor, num_experts: int) -> torch.Tensor:
    """(out, E*r) -> (E, out, r): expert e's B factor is the strided column set ``B[:, e::E]``."""
    return lora_b.reshape(lora_b.shape[0], -1, num_experts).permute(2, 0, 1)


def merge_expert_a(per_expert_a: torch.Tensor) -> torch.Tensor:
    """Inverse of `split_expert_a`: (E, r, in) -> (E*r, in)."""
    return per_expert_a.reshape(-1, per_expert_a.shape[-1]).contiguous()


def merge_expert_b(per_expert_b: torch.Tensor) -> torch.Tensor:
    """Inverse of `split_expert_b`: (E, out, r) -> (out, E*r)."""
    num_experts, out_features, _ = per_expert_b.shape
    return per_expert_b.permute(1, 2, 0).reshape(out_features, -1).contiguous()


@dataclass(frozen=True)
class LoraPair:
    """One LoRA-adapted weight: its A/B state-dict keys and what they mean.

    ``kind`` is ``expert`` for a fused (E, ., .) expert parameter, ``router`` for the router weight
    (E, hidden) whose row e belongs to expert e, ``dense`` for everything else (attention, shared
    experts). ``out_features``/``in_features`` are those of the delta B @ A; ``transposed`` is True
    when the base parameter stores each expert as (in, out) (gpt-oss style), so the delta added to
    the weight is (B_e @ A_e)^T.
    """

    a_key: str
    b_key: str
    module: str
    parameter: str | None
    kind: Kind
    layer: int | None
    num_experts: int
    rank: int
    in_features: int
    out_features: int
    scaling: float
    transposed: bool = False

    @property
    def a_shape(self) -> tuple[int, int]:
        return (self.num_experts * self.rank, self.in_features)

    @property
    def b_shape(self) -> tuple[int, int]:
        return (self.out_features, self.num_experts * self.rank)

    def expert_factors(self, state: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, A) per expert: B is (E, out, r), A is (E, r, in). Dense tensors come back with E=1."""
        return split_expert_b(state[self.b_key], self.num_experts), split_expert_a(state[self.a_key], self.num_experts)

    def delta(self, state: dict[str, torch.Tensor]) -> torch.Tensor:
        """The weight delta in the base parameter's orientation, (E, out, in) (or (E, in, out) if transposed).

        For 2D (dense/router) targets the leading expert axis is dropped, like PEFT's own delta.
        """
        b, a = self.expert_factors(state)
        delta = torch.bmm(b.float(), a.float()) * self.scaling
        if self.transposed:
            delta = delta.transpose(1, 2)
        return delta[0] if self.num_experts == 1 else delta


@dataclass
class ExpertLayout:
    """Every LoRA pair of an MoE adapter, indexed by key, with the model's expert geometry."""

    pairs: list[LoraPair]
    num_layers: int
    num_experts: int
    top_k: int
    model_type: str = ""
    _by_key: dict[str, LoraPair] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._by_key = {}
        for pair in self.pairs:
            self._by_key[pair.a_key] = pair
            self._by_key[pair.b_key] = pair

    def pair_of(self, key: str) -> LoraPair:
        return self._by_key[key]

    @property
    def keys(self) -> list[str]:
        return [k for pair in self.pairs for k in (pair.a_key, pair.b_key)]

    def expected_shapes(self) -> dict[str, tuple[int, int]]:
        shapes = {}
        for pair in self.pairs:
            shapes[pair.a_key] = pair.a_shape
            shapes[pair.b_key] = pair.b_shape
        return shapes

    def by_kind(self, kind: Kind) -> list[LoraPair]:
        return [pair for pair in self.pairs if pair.kind == kind]

    def router_of_layer(self, layer: int) -> LoraPair | None:
        for pair in self.pairs:
            if pair.kind == "router" and pair.layer == layer:
                return pair
        return None

    def to_dict(self) -> dict:
        """JSON-serialisable description (what a Flower server receives instead of a model)."""
        return {
            "num_layers": self.num_layers,
            "num_experts": self.num_experts,
            "top_k": self.top_k,
            "model_type": self.model_type,
            "pairs": [pair.__dict__ for pair in self.pairs],
        }

    @classmethod
    def from_dict(cls, data: dict) -> ExpertLayout:
        pairs = [LoraPair(**pair) for pair in data["pairs"]]
        return cls(pairs, data["num_layers"], data["num_experts"], data["top_k"], data.get("model_type", ""))
