"""The TIES / DARE-TIES path of the hub: dense product deltas per expert, merged, re-factorised to rank r.

A deliberately dense baseline (it materialises out x in per expert, as `peft.utils.merge_utils` does).
"""

from __future__ import annotations

import zlib

import torch

from hf_fcmoe.adapters.layout import LoraPair, merge_expert_a, merge_expert_b, split_expert_a, split_expert_b
from hf_fcmoe.aggregation import lowrank
from hf_fcmoe.aggregation.rounds import Round
from hf_fcmoe.aggregation.ties import dare_ties_merge, ties_merge
from hf_fcmoe.aggregation.types import State


def ties_pair(
    rd: Round,
    pair: LoraPair,
    weights: torch.Tensor,
    method: str,
    options: dict,
    server_lr: float,
    round_index: int | None,
    row_mask: torch.Tensor | None = None,
) -> None:
    """TIES/DARE per expert on dense product deltas of one pair; writes the pair's new factors to ``rd``."""
    g_b, g_a = rd.global_state[pair.b_key], rd.global_state[pair.a_key]
    base = _products(pair, rd.global_state)
    deltas = []
    for n, update in enumerate(rd.updates):
        d = _products(pair, update.state) - base
        if row_mask is not None:
            d = d * row_mask[:, n].float()[None, :, None]
        deltas.append(d)
    stacked = torch.stack(deltas)  # (N, E, out, in)
    merged = torch.empty_like(base)
    active = weights > 0
    for e in range(base.shape[0]):
        w_row = weights[min(e, weights.shape[0] - 1)]
        live = active[min(e, active.shape[0] - 1)]
        if not bool(live.any()):
            merged[e] = 0
            continue
        scale = (w_row / w_row[live].mean()).float()
        if method == "ties":
            merged[e] = ties_merge(stacked[live, e], scale[live], options["density"], options["majority_sign_method"])
        else:
            gens = [
                dare_generator(options["seed"], round_index, pair.b_key, e, u.client_id)
                for u, ok in zip(rd.updates, live)
                if ok
            ]
            merged[e] = dare_ties_merge(
                stacked[live, e], scale[live], options["density"], options["majority_sign_method"], gens
            )
    target = (base + server_lr * merged) / pair.scaling  # factors carry no scaling
    ref_a = split_expert_a(g_a.float(), pair.num_experts)
    new_b, new_a, err = lowrank.factorize_dense(target, pair.rank, ref_a)
    rd.truncation.extend(err.tolist())
    new_b, new_a = new_b.float(), new_a.float()
    untouched = (
        ~active.any(-1) if active.shape[0] == pair.num_experts else torch.zeros(pair.num_experts, dtype=torch.bool)
    )
    new_b[untouched] = split_expert_b(g_b.float(), pair.num_experts)[untouched]
    new_a[untouched] = split_expert_a(g_a.float(), pair.num_experts)[untouched]
    rd.new_state[pair.b_key] = merge_expert_b(new_b).to(g_b.dtype)
    rd.new_state[pair.a_key] = merge_expert_a(new_a).to(g_a.dtype)


def dare_generator(seed: int, round_index: int | None, key: str, expert: int, client_id: str) -> torch.Generator:
    """DARE drop masks seeded by (seed, round, key, expert, client): reproducible, independent of client order."""
    tag = f"{seed}|{round_index}|{key}|{expert}|{client_id}".encode()
    return torch.Generator().manual_seed(zlib.crc32(tag))


def _products(pair: LoraPair, state: State) -> torch.Tensor:
    """(E, out, in) scaled product deltas B_e @ A_e of one pair, in the factors' own orientation."""
    b, a = pair.expert_factors(state)
    return torch.bmm(b.float(), a.float()) * pair.scaling
