"""The per-expert-block path of the hub (fcmoe, fedmoe, fedgh, ties/dare_ties, and fedavg/fedprox in exact mode).

One round, layer by layer: Gram matrices of the layer's expert pairs (one streaming pass over the clients'
factors, `streaming`), per-expert weights (`weighting`), conflict handling in coefficient space
(`projection`), then the new factors.

- factor mode writes each pair right away with one more streaming pass (`streaming.combine`): the new
  global and the residual of every client that conflicted on that pair come out of the same pass;
- exact mode queues a re-factorisation job per pair; all jobs of the round (every expert, pair and layer)
  are solved by one batched, single-threaded `lowrank.refactor` call, then a last streaming pass
  (`streaming.stacked_apply`) writes the new factors and residuals.

Every projected update and residual is a linear combination of the sources ``[global, client_1..N]`` with
per-expert coefficients, so nothing of size ``out x in`` (and no client delta) is ever materialised.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from hf_fcmoe.adapters.layout import ExpertLayout, LoraPair, split_expert_a, split_expert_b
from hf_fcmoe.aggregation import lowrank, streaming
from hf_fcmoe.aggregation.projection import (
    Projection,
    consensus_projection,
    deviation_coefficients,
    pcgrad_coefficients,
)
from hf_fcmoe.aggregation.rounds import Round
from hf_fcmoe.aggregation.ties_pair import ties_pair
from hf_fcmoe.aggregation.weighting import importance_weights, normalize_rows, size_weights


@dataclass
class _ExactJob:
    """One pair's re-factorisation problem, solved later in the round's single batched call."""

    pair: LoraPair
    gram_a: torch.Tensor  # (E, K, K)
    gram_bw: torch.Tensor  # (E, K, K) of the weighted B stack
    ref_a: torch.Tensor  # (E, r, K)
    cols: torch.Tensor | None  # (E, K) column weights folded into T_B (None: router, rows weighted)
    merge: torch.Tensor | None  # (E, N) merge coefficients (for untouched experts); None: no untouched handling
    residual: torch.Tensor | None  # (E, N, N) residual coefficients, or None
    stacked: tuple[torch.Tensor, torch.Tensor] | None = None  # router: (X_Bw, X_A) already weighted


class BlockRound:
    """Runs the block methods for one round and writes ``rd.new_state`` / ``rd.residuals``."""

    def __init__(
        self,
        layout: ExpertLayout,
        method: str,
        options: dict,
        server_lr: float,
        uses_retention: bool,
        rd: Round,
        round_index: int | None,
    ):
        self.layout, self.method, self.options = layout, method, options
        self.eta, self.uses_retention = server_lr, uses_retention
        self.rd, self.round_index = rd, round_index
        self.exact = options.get("lowrank", "factor") == "exact"
        # fcmoe decides conflicts on the product deltas B_i A_i - B_g A_g (gauge-invariant, through r x r Grams)
        # unless conflict_space is 'factor'; exact mode always does
        self.product_space = self.exact or (method == "fcmoe" and options.get("conflict_space") == "product")
        self.per_module = method == "fcmoe" and options.get("conflict_granularity") == "module"
        self.jobs: list[_ExactJob] = []

    def run(self) -> set[str]:
        """Aggregate every expert, router and dense pair; returns the keys written."""
        layout, rd = self.layout, self.rd
        num = len(rd.updates)
        rd.expert_weights = torch.zeros(layout.num_layers, layout.num_experts, num, dtype=torch.float64)
        rd.conflicts = torch.zeros(layout.num_layers, layout.num_experts, dtype=torch.long)
        rd.cosine_sum = torch.zeros(layout.num_layers, dtype=torch.float64)
        handled: set[str] = set()
        dense_weights = size_weights(rd.sizes, torch.ones(1, num, dtype=torch.bool))
        expert_pairs = layout.by_kind("expert")
        for layer in range(layout.num_layers):
            pairs = [p for p in expert_pairs if p.layer == layer]
            if pairs:
                self._expert_layer(layer, pairs)
            router = layout.router_of_layer(layer)
            if router is not None:
                self._router(router, rd.expert_weights[layer], dense_weights[0])
            for pair in pairs + ([router] if router is not None else []):
                handled.update((pair.a_key, pair.b_key))
        for pair in layout.by_kind("dense"):
            if self._dense_pair(pair, dense_weights):
                handled.update((pair.a_key, pair.b_key))
        self._solve_exact()
        return handled

    # ----------------------------------------------------------------- weights and conflicts
    def _needs_gram(self) -> bool:
        if self.method == "fcmoe":
            return self.options["importance"] or self.options["projection"]
        return self.method == "fedgh" or self.exact

    def _base_weights(self, layer: int, gram: torch.Tensor | None) -> torch.Tensor:
        rd = self.rd
        active = rd.active[layer]
        if self.method == "fedmoe":
            return normalize_rows(torch.where(active, rd.counts[layer], torch.zeros_like(rd.counts[layer])))
        if self.method == "fcmoe" and self.options["importance"]:
            norms = torch.diagonal(gram, dim1=-2, dim2=-1).clamp_min(0).sqrt()
            return importance_weights(rd.sizes, rd.frequency[layer], norms, active, self.options["kappa"])
        return size_weights(rd.sizes, active)

    def _transform(
        self, layer: int | None, gram: torch.Tensor | None, weights: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Merge coefficients (B, N) over the deltas and, for fcmoe with retention, residual coefficients."""
        rd = self.rd
        active = weights > 0
        if self.method == "fedgh":
            coef, touched = pcgrad_coefficients(gram, active)
            if layer is not None:
                rd.conflicts[layer] += touched.sum(-1)
            return torch.einsum("bi,bij->bj", weights, coef), None
        if self.method == "fcmoe" and gram is not None:
            # with projection off (the importance-only ablation) conflicts are still measured, not acted on
            proj = consensus_projection(gram, weights, self.options["leave_one_out"])
            if layer is not None:
                self._record(layer, proj.conflict, proj.cosine, active)
            return self._fcmoe_coefficients(proj, weights)
        return weights, None

    def _record(self, layer: int, conflict: torch.Tensor, cosine: torch.Tensor, active: torch.Tensor) -> None:
        self.rd.conflicts[layer] += conflict.sum(-1)
        self.rd.cosine_sum[layer] += torch.where(active, cosine, torch.zeros_like(cosine)).sum()

    def _fcmoe_coefficients(self, proj: Projection, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Merge and residual coefficients of fcmoe from its projection (and retention target)."""
        merge = proj.merge_coef if self.options["projection"] else weights
        if not self.uses_retention:
            return merge, None
        if self.options["retention_target"] == "deviation":
            return merge, deviation_coefficients(merge, weights > 0, self.eta)
        return merge, proj.residual_coef if self.options["projection"] else None

    def _module_transforms(self, layer: int, pair_grams: list[torch.Tensor], weights: torch.Tensor) -> list[tuple]:
        """conflict_granularity 'module': one conflict decision per LoRA pair of the expert (gate_up, down, ...)
        with the expert's weights; a (client, expert) counts as conflicting when any of its modules does."""
        projs = [consensus_projection(g, weights, self.options["leave_one_out"]) for g in pair_grams]
        conflict = torch.stack([p.conflict for p in projs]).any(0)
        cosine = torch.stack([p.cosine for p in projs]).mean(0)
        self._record(layer, conflict, cosine, weights > 0)
        return [self._fcmoe_coefficients(p, weights) for p in projs]

    # ----------------------------------------------------------------- pairs
    def _grams(self, pair: LoraPair):
        """Factor mode: the (E, N, N) delta Gram. Exact mode: (stacked G_B, G_A, product-space delta Gram)."""
        rd = self.rd
        if not self.exact:
            if self.product_space:
                return self._product_grams(pair)[2]
            return streaming.delta_gram(rd.sources(pair.b_key), rd.sources(pair.a_key), pair.num_experts)
        return self._product_grams(pair)

    def _product_grams(self, pair: LoraPair):
        """(stacked G_B, G_A, (E, N, N) inner products of the product deltas B_n A_n - B_g A_g)."""
        rd = self.rd
        gram_b, gram_a = streaming.stacked_grams(rd.sources(pair.b_key), rd.sources(pair.a_key), pair.num_experts)
        k = lowrank.product_gram(gram_b, gram_a, pair.rank) * pair.scaling**2
        delta = k[:, 1:, 1:] - k[:, 1:, :1] - k[:, :1, 1:] + k[:, :1, :1]
        return gram_b, gram_a, delta

    def _expert_layer(self, layer: int, pairs: list[LoraPair]) -> None:
        rd = self.rd
        if self.method in ("ties", "dare_ties"):
            weights = size_weights(rd.sizes, rd.active[layer])
            rd.expert_weights[layer] = weights
            for pair in pairs:
                ties_pair(rd, pair, weights, self.method, self.options, self.eta, self.round_index)
            return
        needs_gram = self._needs_gram()
        grams = [self._grams(pair) for pair in pairs] if needs_gram or self.exact else [None] * len(pairs)
        gram = None
        if needs_gram:
            gram = sum(g[2] for g in grams) if self.exact else sum(grams)
        weights = self._base_weights(layer, gram)
        rd.expert_weights[layer] = weights
        if self.per_module and gram is not None:
            per_pair = self._module_transforms(layer, [g[2] if self.exact else g for g in grams], weights)
        else:
            per_pair = [self._transform(layer, gram, weights)] * len(pairs)
        for pair, pair_grams, (merge, residual) in zip(pairs, grams, per_pair):
            if self.exact:
                self._queue_exact(pair, pair_grams, merge, residual, ref_coef=merge, untouched=True)
            else:
                self._apply_factor(pair, merge, residual)

    def _router(self, pair: LoraPair, rows: torch.Tensor, sizes: torch.Tensor) -> None:
        """Router LoRA: row e of B (and of the product) follows expert e's weights; the shared A is data-size."""
        rd = self.rd
        if self.method in ("ties", "dare_ties"):
            everyone = size_weights(rd.sizes, torch.ones(1, rows.shape[-1], dtype=torch.bool))
            ties_pair(rd, pair, everyone, self.method, self.options, self.eta, self.round_index, row_mask=rows > 0)
            return
        g_b, g_a = rd.global_state[pair.b_key], rd.global_state[pair.a_key]
        if not self.exact:  # router tensors are tiny: plain per-client deltas
            d_b = torch.stack([u.state[pair.b_key].float() - g_b.float() for u in rd.updates])  # (N, rows, r)
            d_a = torch.stack([u.state[pair.a_key].float() - g_a.float() for u in rd.updates])  # (N, r, in)
            new_b = g_b.float() + self.eta * torch.einsum("en,ner->er", rows.float(), d_b)
            new_a = g_a.float() + self.eta * torch.einsum("n,nri->ri", sizes.float(), d_a)
            untouched = rows.abs().sum(-1) == 0
            new_b[untouched] = g_b.float()[untouched]
            rd.new_state[pair.b_key] = new_b.to(g_b.dtype)
            rd.new_state[pair.a_key] = new_a.to(g_a.dtype)
            return
        xb, xa = lowrank.stack_factors(rd.sources(pair.b_key), rd.sources(pair.a_key), pair.num_experts)
        gram_a = torch.bmm(xa, xa.transpose(1, 2)).double()
        xbw = xb * lowrank.block_expand(self._product_coef(rows), pair.rank).float()[None]
        gram_bw = torch.bmm(xbw.transpose(1, 2), xbw).double()
        ref_a = self._ref_a(gram_a, sizes[None], pair.rank)
        self.jobs.append(_ExactJob(pair, gram_a, gram_bw, ref_a, None, None, None, stacked=(xbw, xa)))

    def _dense_pair(self, pair: LoraPair, weights: torch.Tensor) -> bool:
        """Attention / shared-expert LoRA: data-size weights (fedgh also projects, ties trims).

        Returns False when the pair is left to the caller's per-tensor FedAvg (factor mode, no projection).
        """
        rd = self.rd
        if self.method in ("ties", "dare_ties"):
            ties_pair(rd, pair, weights, self.method, self.options, self.eta, self.round_index)
            return True
        if not self.exact:
            if self.method != "fedgh":
                return False
            merge, _ = self._transform(None, self._grams(pair), weights)
            self._apply_factor(pair, merge, None)
            return True
        gram_b, gram_a, delta = self._grams(pair)
        merge = self._transform(None, delta, weights)[0] if self.method == "fedgh" else weights
        self._queue_exact(pair, (gram_b, gram_a, delta), merge, None, ref_coef=weights, untouched=True)
        return True

    # ----------------------------------------------------------------- factor mode
    def _product_coef(self, merge: torch.Tensor) -> torch.Tensor:
        """(B, N) coefficients over the deltas -> (B, N+1) over [global, clients] of ``g + eta sum_j m_j d_j``."""
        eta = self.eta
        return torch.cat([1.0 - eta * merge.sum(-1, keepdim=True), eta * merge], dim=-1)

    @staticmethod
    def _residual_sources(residual: torch.Tensor, client: int) -> torch.Tensor:
        """(E, N+1) coefficients over [global, clients] of ``rho_i = sum_j residual[e, i, j] (x_j - g)``."""
        row = residual[:, client]
        return torch.cat([-row.sum(-1, keepdim=True), row], dim=-1)

    def _conflicted(self, residual: torch.Tensor | None) -> list[int]:
        """Clients with a non-zero residual somewhere on this pair (only they get residual tensors)."""
        if residual is None:
            return []
        return [i for i in range(residual.shape[1]) if bool((residual[:, i] != 0).any())]

    def _apply_factor(self, pair: LoraPair, merge: torch.Tensor, residual: torch.Tensor | None) -> None:
        """One streaming pass per factor: the new global and the residuals of conflicting clients.

        A residual that is a per-expert multiple of the merged update (FC-MoE's paper consensus: every
        conflicting client loses a multiple of the same consensus, and the merge is another) is derived from
        the new global's chunk in the same pass instead of being recombined from all sources.
        """
        rd = self.rd
        g_b, g_a = rd.global_state[pair.b_key], rd.global_state[pair.a_key]
        conflicted = self._conflicted(residual)
        scales = self._residual_scales(merge, residual, conflicted)
        coef = [self._product_coef(merge)]
        if scales is None:
            coef += [self._residual_sources(residual, i) for i in conflicted]
        coef = torch.stack(coef).transpose(1, 2)  # (O, N+1, E)
        experts = pair.num_experts
        new_b, *rho_b = streaming.combine(rd.sources(pair.b_key), coef, experts, "b", g_b.dtype, derived=scales)
        new_a, *rho_a = streaming.combine(rd.sources(pair.a_key), coef, experts, "a", g_a.dtype, derived=scales)
        self._write(pair, merge, new_b, new_a, conflicted, rho_b, rho_a)

    def _residual_scales(
        self, merge: torch.Tensor, residual: torch.Tensor | None, conflicted: list[int]
    ) -> torch.Tensor | None:
        """(C, E) scales s with ``rho_i = s[i, e] * (new - global)`` per expert, or None if a residual is not
        such a multiple (leave-one-out consensus). The new global moves by ``eta * sum_j merge_j d_j``."""
        if not conflicted:
            return None
        rows = residual[:, conflicted].transpose(0, 1)  # (C, E, N)
        norm2 = (merge * merge).sum(-1)  # (E,)
        ratio = (rows * merge).sum(-1) / norm2.clamp_min(1e-300)
        ratio = torch.where(norm2 > 0, ratio, torch.zeros_like(ratio))
        gap = (rows - ratio[..., None] * merge).abs().amax()
        if gap > 1e-9 * rows.abs().amax().clamp_min(1e-300):
            return None
        return ratio / self.eta

    def _write(self, pair, merge, new_b, new_a, conflicted, rho_b, rho_a) -> None:
        rd = self.rd
        g_b, g_a = rd.global_state[pair.b_key], rd.global_state[pair.a_key]
        if merge is not None:
            untouched = merge.abs().sum(-1) == 0
            if untouched.any():  # experts nobody routed to keep their factors bit for bit
                split_expert_b(new_b, pair.num_experts)[untouched] = split_expert_b(g_b, pair.num_experts)[untouched]
                split_expert_a(new_a, pair.num_experts)[untouched] = split_expert_a(g_a, pair.num_experts)[untouched]
        rd.new_state[pair.b_key] = new_b
        rd.new_state[pair.a_key] = new_a
        for i, rho_bi, rho_ai in zip(conflicted, rho_b, rho_a):
            store = rd.residuals.setdefault(rd.updates[i].client_id, {})
            store[pair.b_key] = rho_bi
            store[pair.a_key] = rho_ai

    # ----------------------------------------------------------------- exact mode
    def _ref_a(self, gram_a: torch.Tensor, ref_coef: torch.Tensor, rank: int) -> torch.Tensor:
        """A_ref X_A^T for the factor-space merge A_ref = sum_m coef_m A_m (rows of G_A, no data pass)."""
        batch, size, _ = gram_a.shape
        return (gram_a.reshape(batch, -1, rank, size) * self._product_coef(ref_coef)[:, :, None, None]).sum(1)

    def _queue_exact(self, pair, grams, merge, residual, ref_coef, untouched: bool) -> None:
        gram_b, gram_a, _ = grams
        cols = lowrank.block_expand(self._product_coef(merge), pair.rank)
        gram_bw = cols[:, :, None] * gram_b * cols[:, None, :]
        ref_a = self._ref_a(gram_a, ref_coef, pair.rank)
        self.jobs.append(_ExactJob(pair, gram_a, gram_bw, ref_a, cols, merge if untouched else None, residual))

    def _solve_exact(self) -> None:
        """All queued re-factorisations in one batched single-threaded call, then one apply pass per pair."""
        if not self.jobs:
            return
        jobs, self.jobs = self.jobs, []
        rd = self.rd
        by_rank: dict[tuple[int, int], list[int]] = {}
        for index, job in enumerate(jobs):
            by_rank.setdefault((job.pair.rank, job.gram_a.shape[-1]), []).append(index)
        solved: list = [None] * len(jobs)
        errors: list = [None] * len(jobs)
        for (rank, _), members in by_rank.items():
            sizes = [jobs[i].gram_a.shape[0] for i in members]
            with lowrank.single_threaded():
                t_a, t_b, err = lowrank.refactor(
                    torch.cat([jobs[i].gram_a for i in members]),
                    torch.cat([jobs[i].gram_bw for i in members]),
                    torch.cat([jobs[i].ref_a for i in members]),
                    rank,
                )
            for i, a, b, e in zip(members, t_a.split(sizes), t_b.split(sizes), err.split(sizes)):
                solved[i], errors[i] = (a, b), e
        for err in errors:
            rd.truncation.extend(err.tolist())
        for job, (t_a, t_b) in zip(jobs, solved):
            job.gram_a = job.gram_bw = None  # free the Grams as we go
            self._apply_exact(job, t_a, t_b)

    def _apply_exact(self, job: _ExactJob, t_a: torch.Tensor, t_b: torch.Tensor) -> None:
        rd, pair = self.rd, job.pair
        g_b, g_a = rd.global_state[pair.b_key], rd.global_state[pair.a_key]
        if job.stacked is not None:  # router: rows of B carry their own weights
            xbw, xa = job.stacked
            new_b, new_a = torch.bmm(xbw, t_b.float()), torch.bmm(t_a.float(), xa)
            rd.new_state[pair.b_key] = new_b.permute(1, 2, 0).reshape(g_b.shape).to(g_b.dtype)
            rd.new_state[pair.a_key] = new_a.reshape(g_a.shape).to(g_a.dtype)
            return
        # Residuals are factor-space: rho_i = X_B kron(c_i, I_r) and kron(c_i, I_r)^T X_A in the same pass.
        conflicted = self._conflicted(job.residual)
        eye = torch.eye(pair.rank, dtype=torch.float64)
        t_b_all = [job.cols[:, :, None] * t_b]
        t_a_all = [t_a]
        for i in conflicted:
            c = self._residual_sources(job.residual, i)  # (E, M)
            kron = (c[:, :, None, None] * eye).reshape(c.shape[0], -1, pair.rank)  # (E, K, r)
            t_b_all.append(kron)
            t_a_all.append(kron.transpose(1, 2))
        new_b, new_a = streaming.stacked_apply(
            rd.sources(pair.b_key),
            rd.sources(pair.a_key),
            pair.num_experts,
            torch.cat(t_b_all, -1),
            torch.cat(t_a_all, 1),
            g_b.dtype,
        )
        if g_a.dtype != g_b.dtype:
            new_a = [t.to(g_a.dtype) for t in new_a]
        self._write(pair, job.merge, new_b[0], new_a[0], conflicted, new_b[1:], new_a[1:])
