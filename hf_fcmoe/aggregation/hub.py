"""The aggregation hub: validates client updates, cuts them per expert with the `ExpertLayout`, and dispatches
to one aggregation method. The only module here that knows `ClientUpdate` and `ExpertLayout`; the merging math
lives in small pure-torch modules (weighting, projection, lowrank, ties, server_opt, fedavg).
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field

import torch

from hf_fcmoe.aggregation import lowrank
from hf_fcmoe.aggregation.fedavg import fedavg_tensor, mean_delta, normalized_weights
from hf_fcmoe.aggregation.projection import consensus_projection, pcgrad_coefficients
from hf_fcmoe.aggregation.server_opt import ServerOptimizer
from hf_fcmoe.aggregation.ties import dare_ties_merge, ties_merge
from hf_fcmoe.aggregation.types import AggregationResult, ClientUpdate, State
from hf_fcmoe.aggregation.validation import partition_valid
from hf_fcmoe.aggregation.weighting import activation_frequency, importance_weights, normalize_rows, size_weights
from hf_fcmoe.layout import ExpertLayout, LoraPair, merge_expert_a, merge_expert_b, split_expert_a, split_expert_b

METHODS = ("fcmoe", "fedavg", "fedprox", "fedadam", "fedyogi", "ties", "dare_ties", "fedgh", "fedmoe", "local")

_LOWRANK = {"lowrank": "factor"}
_DEFAULTS: dict[str, dict] = {
    "fcmoe": {
        **_LOWRANK,
        "retention": True,
        "retention_lambda": 0.5,
        "importance": True,
        "kappa": 2.0,
        "projection": True,
        "leave_one_out": False,
    },
    "fedavg": dict(_LOWRANK),
    "fedprox": {**_LOWRANK, "mu": 0.01},
    "fedadam": {"beta1": 0.9, "beta2": 0.99, "tau": 1e-3},
    "fedyogi": {"beta1": 0.9, "beta2": 0.99, "tau": 1e-3},
    "ties": {"density": 0.2, "majority_sign_method": "total"},
    "dare_ties": {"density": 0.2, "majority_sign_method": "total", "seed": 0},
    "fedgh": dict(_LOWRANK),
    "fedmoe": dict(_LOWRANK),
    "local": {},
}
# Methods that ignore a client's delta on experts it routed no tokens to.
_MASKED = {"fcmoe", "fedmoe", "fedgh", "ties", "dare_ties"}


@dataclass
class _Round:
    """Everything one aggregation round shares between layers (N accepted clients, sorted by id)."""

    updates: list[ClientUpdate]
    global_state: State
    sizes: torch.Tensor  # (N,) float64
    counts: torch.Tensor  # (L, E, N) float64 routed tokens (ones where a client reported none)
    frequency: torch.Tensor  # (L, E, N)
    active: torch.Tensor  # (L, E, N) bool
    new_state: State = field(default_factory=dict)
    residuals: dict[str, State] = field(default_factory=dict)
    expert_weights: torch.Tensor | None = None  # (L, E, N)
    conflicts: torch.Tensor | None = None  # (L, E) int
    cosine_sum: torch.Tensor | None = None  # (L,) over active (client, expert) pairs
    truncation: list[float] = field(default_factory=list)


@dataclass
class _PairData:
    """One LoRA pair's client data for a round: factor deltas (factor mode) or stacked factors (exact mode)."""

    pair: LoraPair
    d_b: torch.Tensor | None = None  # (N, E, out, r) client B minus global B per expert, float32
    d_a: torch.Tensor | None = None  # (N, E, r, in)
    xb: torch.Tensor | None = None  # (E, out, (N+1) r), block 0 is the global
    xa: torch.Tensor | None = None  # (E, (N+1) r, in)
    gram_b: torch.Tensor | None = None
    gram_a: torch.Tensor | None = None


class AggregationHub:
    """Merge client adapter states into a new global state (and per-client personalized states).

    Args:
        layout: the adapter's `ExpertLayout` (built from configs alone; no base weights).
        method: one of `METHODS`:

            - ``fcmoe``: FC-MoE (DESIGN.md section 5). Per expert block (layer, expert) over the clients that
              routed tokens to it: importance weights, consensus projection of conflicting updates, and
              local knowledge retention of the projected-out residual. Router rows follow their expert's
              importance weights, the router's shared A factor and dense (attention / shared-expert) LoRA use
              data-size weights. Experts nobody routed to stay unchanged.
            - ``fedavg``: data-size weighted mean of every tensor (McMahan et al.). Expert-unaware on purpose:
              a client's delta on an expert it never used is averaged in (it is zero when it trained without
              weight decay on idle experts), which is the dilution the MoE-aware methods remove.
            - ``fedprox``: FedAvg on the server; ``mu`` is the client-side proximal coefficient, kept here
              (``hub.mu``) for the engine to hand to clients.
            - ``fedadam`` / ``fedyogi``: server Adam/Yogi on the FedAvg mean delta (Reddi et al. 2021); the
              moments live in the hub (`state_dict` / `load_state_dict`). ``server_lr`` is the server
              learning rate here: use ~1e-3..1e-2, not 1.0.
            - ``ties`` / ``dare_ties``: TIES / DARE-TIES per expert on the product delta B@A (as
              `peft.utils.merge_utils`), weights n_i / mean(n) over active clients, then re-factorised to rank r.
              They materialise out x in per expert: they are baselines, not the fast path.
            - ``fedgh``: FedGH / PCGrad-style server: each client's update is projected off every other client's
              update it conflicts with (per expert block, per dense pair), then data-size averaged.
            - ``fedmoe``: per-expert average over the clients that activated the expert, weighted by their
              routed token counts; router rows follow, dense LoRA by data size.
            - ``local``: no aggregation; the global stays as it was and ``personalized[cid]`` is the client's own
              state, i.e. every client keeps training alone (the no-collaboration reference).
        server_lr: server step eta applied to the aggregate of every method (fedavg included): new global =
            global + eta * aggregated delta. Tune it for fedavg before crediting a method with a better magnitude.

    Options (keyword arguments; any other name raises TypeError, a bad value ValueError):
        lowrank (fcmoe, fedavg, fedprox, fedgh, fedmoe): ``"factor"`` (default) or ``"exact"``.
            factor: A and B are merged separately with the block's coefficients; inner products and norms are
            taken in factor space. Cost is a few passes over memory (<= 1.5x fedavg), the merged factors stay in
            the coordinates clients train in, and retention residuals are exact in state space. Its price: the
            merged B@A is not the weighted sum of the client products (cross terms).
            exact: conflicts, norms and cosines are measured on the products B_i A_i through r x r Gram matrices,
            and the merged product (the weighted sum of the projected client products) is re-factorised to rank r
            by a truncated SVD computed from stacked factors (`lowrank.refactor`), never forming out x in. The
            truncation error is reported in diagnostics; the new factors are gauge-matched to the factor-space
            merge so training continues from comparable A/B scales. Residuals stay factor-space (a first-order
            proxy of the product-space residual). It is compute-bound (~N^2 r^2 (out+in) flops per expert), and
            whenever clients disagree the rank-r truncation throws away most of what exactness bought, which
            is why factor is the default.
        retention (fcmoe, default True), retention_lambda (fcmoe, default 0.5): keep the projected-out part
            rho_i per client; the client's personalized adapter (and next starting point) is
            ``global + retention_lambda * rho_i``. ``hub.uses_retention`` tells the engine to start clients
            from it and to expect ``trained - lambda * rho_i`` back.
        importance (fcmoe, default True): weight c_i ~ n_i * f_i * min(||d_i||, kappa * median ||d_j||); False
            uses data-size weights n_i over the active clients (with projection off and every client active on
            every expert this is exactly fedavg).
        kappa (fcmoe, default 2.0): clip of the norm term at kappa x the median active norm; None: no clip.
        projection (fcmoe, default True): project conflicting updates (negative inner product with the
            consensus) onto the consensus' orthogonal complement.
        leave_one_out (fcmoe, default False): compare each client with the consensus of the *other* clients.
            Default False follows the paper's formula; with few clients a client's own share of the consensus
            hides its conflicts, which leave-one-out reveals.
        mu (fedprox, default 0.01): the client-side proximal coefficient (not used by the hub itself).
        beta1, beta2, tau (fedadam/fedyogi; 0.9, 0.99, 1e-3): server optimizer constants.
        density (ties/dare_ties, default 0.2): fraction of entries kept per client delta.
        majority_sign_method (ties/dare_ties, default "total"): "total" or "frequency" sign election.
        seed (dare_ties, default 0): DARE's drop masks are drawn from generators seeded by
            (seed, round, tensor key, client id), so they are reproducible and independent of client order.

    Client activity: a client is active on expert (l, e) when ``expert_counts[l, e] > 0``; a client that sent
    no counts is treated as active on every expert with uniform frequency.
    """

    def __init__(self, layout: ExpertLayout, method: str = "fedavg", server_lr: float = 1.0, **options):
        if method not in METHODS:
            raise ValueError(f"unknown aggregation method {method!r}; available: {', '.join(METHODS)}")
        allowed = _DEFAULTS[method]
        unknown = sorted(set(options) - set(allowed))
        if unknown:
            raise TypeError(f"unknown option(s) for method {method!r}: {unknown}; allowed: {sorted(allowed)}")
        self.layout = layout
        self.method = method
        self.server_lr = float(server_lr)
        self.options = {**allowed, **options}
        self._check_options()
        opts = self.options
        self.lowrank = opts.get("lowrank", "factor")
        self.uses_retention = bool(method == "fcmoe" and opts["retention"] and opts["retention_lambda"] > 0)
        self.retention_lambda = float(opts["retention_lambda"]) if self.uses_retention else 0.0
        self.mu = float(opts.get("mu", 0.0))
        self._optimizer = None
        if method in ("fedadam", "fedyogi"):
            kind = "adam" if method == "fedadam" else "yogi"
            self._optimizer = ServerOptimizer(kind, self.server_lr, opts["beta1"], opts["beta2"], opts["tau"])

    def _check_options(self) -> None:
        opts = self.options
        if opts.get("lowrank", "factor") not in ("factor", "exact"):
            raise ValueError(f"lowrank must be 'factor' or 'exact', got {opts['lowrank']!r}")
        if "density" in opts and not 0 < opts["density"] <= 1:
            raise ValueError(f"density must be in (0, 1], got {opts['density']!r}")
        if opts.get("majority_sign_method", "total") not in ("total", "frequency"):
            raise ValueError(
                f"majority_sign_method must be 'total' or 'frequency', got {opts['majority_sign_method']!r}"
            )
        if opts.get("retention_lambda", 0.0) < 0:
            raise ValueError(f"retention_lambda must be >= 0, got {opts['retention_lambda']!r}")
        if opts.get("kappa") is not None and opts.get("kappa", 1.0) <= 0:
            raise ValueError(f"kappa must be positive or None, got {opts['kappa']!r}")
        if not self.server_lr > 0:
            raise ValueError(f"server_lr must be positive, got {self.server_lr!r}")

    # ----------------------------------------------------------------- checkpointing of server state
    def state_dict(self) -> dict:
        """Server-side state to checkpoint (FedAdam/FedYogi moments; {} for stateless methods)."""
        return {"method": self.method, "server_opt": self._optimizer.state_dict()} if self._optimizer else {}

    def load_state_dict(self, state: dict) -> None:
        """Restore what `state_dict` returned, so a resumed run continues exactly."""
        if self._optimizer is not None and state:
            if state.get("method") != self.method:
                raise ValueError(f"state is for method {state.get('method')!r}, hub runs {self.method!r}")
            self._optimizer.load_state_dict(state["server_opt"])

    # ----------------------------------------------------------------- the round
    def aggregate(
        self, global_state: State, updates: list[ClientUpdate], round: int | None = None
    ) -> AggregationResult:
        """Validate ``updates``, merge the accepted ones into a new global state and return it with diagnostics."""
        missing = [k for k in self.layout.keys if k not in global_state]
        if missing:
            raise ValueError(f"global_state lacks layout keys {missing[:3]}")
        accepted, rejected = partition_valid(updates, global_state, self.layout)
        accepted = sorted(accepted, key=lambda u: u.client_id)
        diagnostics: dict = {
            "round": round,
            "method": self.method,
            "rejected": rejected,
            "num_accepted": len(accepted),
        }
        if self.lowrank != "factor":
            diagnostics["lowrank"] = self.lowrank
        if not accepted:
            diagnostics.update(self._conflict_diagnostics(None, None))
            return AggregationResult(global_state=dict(global_state), diagnostics=diagnostics, failed=True)
        rd = self._prepare(global_state, accepted)
        if self.method == "local":
            rd.new_state = dict(global_state)
        elif self.method in ("fedadam", "fedyogi"):
            self._server_optimizer_round(rd)
        elif self.method in ("fedavg", "fedprox") and self.lowrank == "factor":
            self._fedavg_keys(rd, list(global_state))
        else:
            self._block_round(rd, round)
        diagnostics.update(self._conflict_diagnostics(rd, rd.conflicts))
        if rd.truncation:
            diagnostics["truncation_error"] = {
                "max": max(rd.truncation),
                "mean": sum(rd.truncation) / len(rd.truncation),
            }
        return AggregationResult(
            rd.new_state,
            personalized=self._personalized(rd),
            residuals=rd.residuals,
            weights=self._weights(rd),
            diagnostics=diagnostics,
        )

    def _prepare(self, global_state: State, accepted: list[ClientUpdate]) -> _Round:
        layers, experts = self.layout.num_layers, self.layout.num_experts
        counts = torch.stack(
            [
                u.expert_counts.to(torch.float64)
                if u.expert_counts is not None
                else torch.ones(layers, experts, dtype=torch.float64)
                for u in accepted
            ],
            dim=-1,
        )
        frequency = activation_frequency(counts.transpose(-1, -2)).transpose(-1, -2)
        active = counts > 0
        if self.method not in _MASKED:
            active = torch.ones_like(active)
        sizes = torch.tensor([float(u.num_examples) for u in accepted], dtype=torch.float64)
        return _Round(accepted, global_state, sizes, counts, frequency, active)

    # ----------------------------------------------------------------- per-tensor methods
    def _fedavg_keys(self, rd: _Round, keys: list[str]) -> None:
        weights = normalized_weights(rd.sizes.tolist())
        for key in keys:
            rd.new_state[key] = fedavg_tensor(
                rd.global_state[key], [u.state[key] for u in rd.updates], weights, self.server_lr
            )

    def _server_optimizer_round(self, rd: _Round) -> None:
        weights = normalized_weights(rd.sizes.tolist())
        self._optimizer.steps += 1
        for key, tensor in rd.global_state.items():
            delta = mean_delta(tensor, [u.state[key] for u in rd.updates], weights)
            rd.new_state[key] = self._optimizer.step(key, tensor, delta)

    # ----------------------------------------------------------------- block methods
    def _block_round(self, rd: _Round, round_index: int | None) -> None:
        layout = self.layout
        num = len(rd.updates)
        rd.expert_weights = torch.zeros(layout.num_layers, layout.num_experts, num, dtype=torch.float64)
        rd.conflicts = torch.zeros(layout.num_layers, layout.num_experts, dtype=torch.long)
        rd.cosine_sum = torch.zeros(layout.num_layers, dtype=torch.float64)
        handled: set[str] = set()
        dense_weights = size_weights(rd.sizes, torch.ones(1, num, dtype=torch.bool))
        for layer in range(layout.num_layers):
            expert_pairs = [p for p in layout.by_kind("expert") if p.layer == layer]
            if expert_pairs:
                self._expert_layer(rd, layer, expert_pairs, round_index)
            router = layout.router_of_layer(layer)
            if router is not None:
                self._router(rd, router, rd.expert_weights[layer], dense_weights[0], round_index)
            for pair in expert_pairs + ([router] if router is not None else []):
                handled.update((pair.a_key, pair.b_key))
        for pair in layout.by_kind("dense"):
            self._dense_pair(rd, pair, dense_weights, round_index)
            handled.update((pair.a_key, pair.b_key))
        self._fedavg_keys(rd, [k for k in rd.global_state if k not in handled])

    def _base_weights(self, rd: _Round, layer: int, gram: torch.Tensor | None) -> torch.Tensor:
        active = rd.active[layer]
        if self.method == "fedmoe":
            return normalize_rows(torch.where(active, rd.counts[layer], torch.zeros_like(rd.counts[layer])))
        if self.method == "fcmoe" and self.options["importance"]:
            norms = torch.diagonal(gram, dim1=-2, dim2=-1).clamp_min(0).sqrt()
            return importance_weights(rd.sizes, rd.frequency[layer], norms, active, self.options["kappa"])
        return size_weights(rd.sizes, active)

    def _needs_gram(self) -> bool:
        if self.method == "fcmoe":
            return self.options["importance"] or self.options["projection"]
        return self.method == "fedgh" or self.lowrank == "exact"

    def _expert_layer(self, rd: _Round, layer: int, pairs: list[LoraPair], round_index: int | None) -> None:
        if self.method in ("ties", "dare_ties"):
            weights = size_weights(rd.sizes, rd.active[layer])
            rd.expert_weights[layer] = weights
            for pair in pairs:
                self._ties_pair(rd, pair, weights, round_index)
            return
        data = [self._pair_data(rd, pair) for pair in pairs]
        gram = sum(self._delta_gram(d) for d in data) if self._needs_gram() else None
        weights = self._base_weights(rd, layer, gram)
        rd.expert_weights[layer] = weights
        merge, residual = self._transform(rd, layer, gram, weights)
        for d in data:
            self._apply(rd, d, merge, residual, ref_coef=merge)

    def _transform(
        self, rd: _Round, layer: int | None, gram: torch.Tensor | None, weights: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Merge coefficients (B, N) over the deltas and, for fcmoe with retention, residual coefficients."""
        active = weights > 0
        if self.method == "fedgh":
            coef, touched = pcgrad_coefficients(gram, active)
            if layer is not None:
                rd.conflicts[layer] += touched.sum(-1)
            return torch.einsum("bi,bij->bj", weights, coef), None
        if self.method == "fcmoe" and self.options["projection"]:
            proj = consensus_projection(gram, weights, self.options["leave_one_out"])
            if layer is not None:
                rd.conflicts[layer] += proj.conflict.sum(-1)
                rd.cosine_sum[layer] += torch.where(active, proj.cosine, torch.zeros_like(proj.cosine)).sum()
            return proj.merge_coef, proj.residual_coef if self.uses_retention else None
        return weights, None

    def _pair_data(self, rd: _Round, pair: LoraPair) -> _PairData:
        g_b, g_a = rd.global_state[pair.b_key], rd.global_state[pair.a_key]
        if self.lowrank == "exact":
            xb, xa = lowrank.stack_factors(
                [g_b] + [u.state[pair.b_key] for u in rd.updates],
                [g_a] + [u.state[pair.a_key] for u in rd.updates],
                pair.num_experts,
            )
            gram_b, gram_a = lowrank.gram_matrices(xb, xa)
            return _PairData(pair, xb=xb, xa=xa, gram_b=gram_b, gram_a=gram_a)
        return _factor_deltas(pair, g_b, g_a, rd.updates)

    def _delta_gram(self, data: _PairData) -> torch.Tensor:
        """(E, N, N) inner products of the client deltas of each expert of this pair."""
        pair = data.pair
        if data.d_b is not None:
            flat_b, flat_a = _expert_major(data.d_b), _expert_major(data.d_a)
            gram = torch.bmm(flat_b, flat_b.transpose(1, 2)) + torch.bmm(flat_a, flat_a.transpose(1, 2))
            return gram.double()
        k = lowrank.product_gram(data.gram_b, data.gram_a, pair.rank) * pair.scaling**2
        return k[:, 1:, 1:] - k[:, 1:, :1] - k[:, :1, 1:] + k[:, :1, :1]

    def _apply(
        self, rd: _Round, data: _PairData, merge: torch.Tensor, residual: torch.Tensor | None, ref_coef: torch.Tensor
    ) -> None:
        """Write the pair's new global factors (and client residuals) for merge coefficients (E, N) over deltas."""
        pair = data.pair
        g_b, g_a = rd.global_state[pair.b_key], rd.global_state[pair.a_key]
        untouched = merge.abs().sum(-1) == 0
        if data.d_b is not None:
            new_b, new_a = self._combine(data, merge)
            new_b = g_b.float() + self.server_lr * new_b
            new_a = g_a.float() + self.server_lr * new_a
        else:
            new_b, new_a = self._exact_factors(rd, data, merge, ref_coef)
        if untouched.any():  # experts nobody routed to keep their factors bit for bit
            b_view, a_view = split_expert_b(new_b, pair.num_experts), split_expert_a(new_a, pair.num_experts)
            b_view[untouched] = split_expert_b(g_b.float(), pair.num_experts)[untouched]
            a_view[untouched] = split_expert_a(g_a.float(), pair.num_experts)[untouched]
        rd.new_state[pair.b_key] = new_b.to(g_b.dtype)
        rd.new_state[pair.a_key] = new_a.to(g_a.dtype)
        if residual is not None:
            self._residuals(rd, data, residual)

    def _client_deltas(self, rd: _Round, data: _PairData) -> _PairData:
        if data.d_b is not None:
            return data
        pair = data.pair
        return _factor_deltas(pair, rd.global_state[pair.b_key], rd.global_state[pair.a_key], rd.updates)

    @staticmethod
    def _combine(data: _PairData, coef: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """sum_n coef[e, n] * delta_n per expert e (one batched product), in the PEFT layout, float32."""
        coef = coef.float()[:, None, :]
        out_b = torch.bmm(coef, _expert_major(data.d_b)).reshape(data.d_b.shape[1:])
        out_a = torch.bmm(coef, _expert_major(data.d_a)).reshape(data.d_a.shape[1:])
        return merge_expert_b(out_b), merge_expert_a(out_a)

    def _residuals(self, rd: _Round, data: _PairData, residual: torch.Tensor) -> None:
        """rho_i = sum_j residual[e, i, j] d_j for every client with a conflict on this pair (factor space)."""
        if not bool((residual != 0).any()):
            return
        deltas = self._client_deltas(rd, data)
        pair = data.pair
        for i, update in enumerate(rd.updates):
            if bool((residual[:, i] != 0).any()):
                rho_b, rho_a = self._combine(deltas, residual[:, i])
                store = rd.residuals.setdefault(update.client_id, {})
                store[pair.b_key] = rho_b.to(rd.global_state[pair.b_key].dtype)
                store[pair.a_key] = rho_a.to(rd.global_state[pair.a_key].dtype)

    def _product_coef(self, merge: torch.Tensor) -> torch.Tensor:
        """Coefficients over [global, client_1..N] of ``P_g + eta * sum_j merge_j (P_j - P_g)``."""
        eta = self.server_lr
        return torch.cat([1.0 - eta * merge.sum(-1, keepdim=True), eta * merge], dim=-1)

    def _exact_factors(
        self,
        rd: _Round,
        data: _PairData,
        merge: torch.Tensor,
        ref_coef: torch.Tensor,
        row_coef: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Exact merge of one pair: rank-r factors of ``P_g + eta sum_j merge_j (P_j - P_g)`` (PEFT layout).

        ``row_coef`` (rows, N) replaces ``merge`` row-wise for a router (row e follows expert e's weights).
        """
        rank = data.pair.rank
        # A_ref = factor-space merge of A = sum_m coef_m A_m, so A_ref X_A^T = sum_m coef_m G_A[m-th row block].
        batch, size, _ = data.gram_a.shape
        ref_a = (data.gram_a.reshape(batch, -1, rank, size) * self._product_coef(ref_coef)[:, :, None, None]).sum(1)
        if row_coef is None:
            cols = lowrank.block_expand(self._product_coef(merge), rank)
            gram_bw = cols[:, :, None] * data.gram_b * cols[:, None, :]
            xbw = None
        else:
            xbw = data.xb * lowrank.block_expand(self._product_coef(row_coef), rank).float()[None]
            gram_bw = torch.bmm(xbw.transpose(1, 2), xbw).double()
            cols = None
        t_a, t_b, err = lowrank.refactor(data.gram_a, gram_bw, ref_a, rank)
        rd.truncation.extend(err.tolist())
        new_a = torch.bmm(t_a.float(), data.xa)
        if xbw is None:
            new_b = torch.bmm(data.xb, (cols[:, :, None] * t_b).float())
        else:
            new_b = torch.bmm(xbw, t_b.float())
        return merge_expert_b(new_b), merge_expert_a(new_a)

    def _router(
        self, rd: _Round, pair: LoraPair, expert_weights: torch.Tensor, sizes: torch.Tensor, round_index
    ) -> None:
        """Router LoRA: row e of B (and of the product) follows expert e's weights; the shared A is data-size."""
        rows = expert_weights
        if self.method in ("ties", "dare_ties"):
            everyone = size_weights(rd.sizes, torch.ones(1, rows.shape[-1], dtype=torch.bool))
            self._ties_pair(rd, pair, everyone, round_index, row_mask=rows > 0)
            return
        data = self._pair_data(rd, pair)
        g_b, g_a = rd.global_state[pair.b_key], rd.global_state[pair.a_key]
        if data.d_b is not None:
            # B is (E_rows, r): scale each client's row deltas by that expert's weight.
            new_b = g_b.float() + self.server_lr * torch.einsum("en,ner->er", rows.float(), data.d_b[:, 0])
            new_a = g_a.float() + self.server_lr * torch.einsum("n,nri->ri", sizes.float(), data.d_a[:, 0])
            untouched = rows.abs().sum(-1) == 0
            new_b[untouched] = g_b.float()[untouched]
        else:
            new_b, new_a = self._exact_factors(rd, data, sizes[None], sizes[None], row_coef=rows)
        rd.new_state[pair.b_key] = new_b.to(g_b.dtype)
        rd.new_state[pair.a_key] = new_a.to(g_a.dtype)

    def _dense_pair(self, rd: _Round, pair: LoraPair, weights: torch.Tensor, round_index) -> None:
        """Attention / shared-expert LoRA: data-size weights (fedgh also projects, ties trims) for this pair."""
        if self.method in ("ties", "dare_ties"):
            self._ties_pair(rd, pair, weights, round_index)
            return
        data = self._pair_data(rd, pair)
        if self.method == "fedgh":
            merge, _ = self._transform(rd, None, self._delta_gram(data), weights)
        else:
            merge = weights
        if data.d_b is not None and self.method != "fedgh":
            self._fedavg_keys(rd, [pair.a_key, pair.b_key])
            return
        self._apply(rd, data, merge, None, ref_coef=weights)

    # ----------------------------------------------------------------- TIES / DARE-TIES
    def _ties_pair(
        self, rd: _Round, pair: LoraPair, weights: torch.Tensor, round_index, row_mask: torch.Tensor | None = None
    ) -> None:
        """TIES/DARE per expert on dense product deltas, re-factorised to rank r (a deliberately dense baseline)."""
        opts = self.options
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
            if self.method == "ties":
                merged[e] = ties_merge(stacked[live, e], scale[live], opts["density"], opts["majority_sign_method"])
            else:
                gens = [
                    self._dare_generator(round_index, pair.b_key, e, u.client_id)
                    for u, ok in zip(rd.updates, live)
                    if ok
                ]
                merged[e] = dare_ties_merge(
                    stacked[live, e], scale[live], opts["density"], opts["majority_sign_method"], gens
                )
        target = (base + self.server_lr * merged) / pair.scaling  # factors carry no scaling
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

    def _dare_generator(self, round_index: int | None, key: str, expert: int, client_id: str) -> torch.Generator:
        tag = f"{self.options['seed']}|{round_index}|{key}|{expert}|{client_id}".encode()
        return torch.Generator().manual_seed(zlib.crc32(tag))

    # ----------------------------------------------------------------- outputs
    def _personalized(self, rd: _Round) -> dict[str, State]:
        if self.method == "local":
            return {u.client_id: u.state for u in rd.updates}
        if not self.uses_retention:
            return {u.client_id: rd.new_state for u in rd.updates}
        zeros = {k: torch.zeros_like(t) for k, t in rd.new_state.items()}
        personalized = {}
        for update in rd.updates:
            own = rd.residuals.get(update.client_id, {})
            rd.residuals[update.client_id] = {k: own.get(k, zeros[k]) for k in rd.new_state}
            personalized[update.client_id] = {
                k: (t + self.retention_lambda * own[k]) if k in own else t for k, t in rd.new_state.items()
            }
        return personalized

    def _weights(self, rd: _Round) -> dict[str, dict[str, float]]:
        dense = normalized_weights(rd.sizes.tolist()).tolist()
        out: dict[str, dict[str, float]] = {}
        for n, update in enumerate(rd.updates):
            row = {"dense": dense[n]}
            if self.method != "local":
                for layer in range(self.layout.num_layers):
                    for expert in range(self.layout.num_experts):
                        value = rd.expert_weights[layer, expert, n] if rd.expert_weights is not None else dense[n]
                        row[f"L{layer}.E{expert}"] = float(value)
            out[update.client_id] = row
        return out

    def _conflict_diagnostics(self, rd: _Round | None, conflicts: torch.Tensor | None) -> dict:
        layers, experts = self.layout.num_layers, self.layout.num_experts
        if conflicts is None:
            conflicts = torch.zeros(layers, experts, dtype=torch.long)
        active = rd.active.sum(-1) if rd is not None else torch.zeros(layers, experts, dtype=torch.long)
        per_layer = [
            float(conflicts[layer].sum()) / float(active[layer].sum()) if active[layer].sum() > 0 else 0.0
            for layer in range(layers)
        ]
        total_active = float(active.sum())
        out = {
            "conflicts": conflicts.tolist(),
            "active_clients": active.tolist(),
            "conflict_rate_per_layer": per_layer,
            "conflict_rate": float(conflicts.sum()) / total_active if total_active else 0.0,
            "untouched_experts": int((active == 0).sum()),
        }
        if rd is not None and rd.cosine_sum is not None and self.method == "fcmoe" and self.options["projection"]:
            out["mean_cosine_per_layer"] = [
                float(rd.cosine_sum[layer]) / float(active[layer].sum()) if active[layer].sum() > 0 else 0.0
                for layer in range(layers)
            ]
        return out


def _products(pair: LoraPair, state: State) -> torch.Tensor:
    """(E, out, in) scaled product deltas B_e @ A_e of one pair, in the factors' own orientation."""
    b, a = pair.expert_factors(state)
    return torch.bmm(b.float(), a.float()) * pair.scaling


def _factor_deltas(pair: LoraPair, g_b: torch.Tensor, g_a: torch.Tensor, updates: list[ClientUpdate]) -> _PairData:
    """Client-minus-global factors in expert-major layout, written in one pass per client."""
    experts, num = pair.num_experts, len(updates)
    base_b, base_a = split_expert_b(g_b.float(), experts), split_expert_a(g_a.float(), experts)
    d_b = torch.empty(num, *base_b.shape)
    d_a = torch.empty(num, *base_a.shape)
    for n, update in enumerate(updates):
        torch.sub(split_expert_b(update.state[pair.b_key].float(), experts), base_b, out=d_b[n])
        torch.sub(split_expert_a(update.state[pair.a_key].float(), experts), base_a, out=d_a[n])
    return _PairData(pair, d_b=d_b, d_a=d_a)


def _expert_major(deltas: torch.Tensor) -> torch.Tensor:
    """(N, E, ...) -> (E, N, L) view: one row per client for each expert, rows contiguous."""
    return deltas.reshape(deltas.shape[0], deltas.shape[1], -1).transpose(0, 1)
