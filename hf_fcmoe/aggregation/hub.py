"""The aggregation hub: validates client updates and dispatches one aggregation method per round.

The only module here that knows `ClientUpdate` and `ExpertLayout`. The pieces, one job each:
`options` (methods, defaults, validation), `validation` (bad updates), `blocks` (the per-expert-block path,
factor and exact), `streaming` (chunked kernels over the clients' factors), `ties_pair` (the dense TIES path),
`outputs` (personalized states, weights, diagnostics) and the pure math in weighting, projection, lowrank,
ties, server_opt and fedavg.
"""

from __future__ import annotations

import torch

from hf_fcmoe.adapters.layout import ExpertLayout
from hf_fcmoe.aggregation.blocks import BlockRound
from hf_fcmoe.aggregation.fedavg import fedavg_tensor, mean_delta, normalized_weights
from hf_fcmoe.aggregation.options import MASKED, METHODS, resolve_options
from hf_fcmoe.aggregation.outputs import client_weights, conflict_diagnostics, personalized_states
from hf_fcmoe.aggregation.rounds import Round
from hf_fcmoe.aggregation.server_opt import ServerOptimizer
from hf_fcmoe.aggregation.types import AggregationResult, ClientUpdate, State
from hf_fcmoe.aggregation.validation import partition_valid
from hf_fcmoe.aggregation.weighting import activation_frequency

__all__ = ["METHODS", "AggregationHub"]


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
            taken in factor space. Cost: three passes over the inputs (validation, Grams, combine; fedavg needs
            two), the merged factors stay in the coordinates clients train in, and retention residuals are exact in
            state space. Its price: the merged B@A is not the weighted sum of the client products (cross terms).
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
        conflict_space (fcmoe, default "product"): where norms, cosines and conflicts are measured. product: on the
            product deltas ``B_i A_i - B_g A_g`` through r x r Gram matrices (gauge-invariant: (B Y^-1, Y A) is the
            same adapter), in factor mode too; factor: on the concatenated factor deltas (cheaper Grams, but a
            client can look conflicting only because of its factors' gauge). Exact mode always uses products.
        conflict_granularity (fcmoe, default "expert"): "expert" decides one conflict per (client, expert) over
            all its LoRA modules; "module" decides per module (gate_up and down separately).
        retention_target (fcmoe, default "projected"): what a client retains: "projected" the part projected
            away (the paper), "deviation" its whole deviation from the new global (``trained_i - global``), so
            the personalized adapter is ``global + retention_lambda * (trained_i - global)`` on the experts.
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
        self.layout = layout
        self.method = method
        self.server_lr = float(server_lr)
        self.options = resolve_options(method, self.server_lr, options)
        opts = self.options
        self.lowrank = opts.get("lowrank", "factor")
        self.uses_retention = bool(method == "fcmoe" and opts["retention"] and opts["retention_lambda"] > 0)
        self.retention_lambda = float(opts["retention_lambda"]) if self.uses_retention else 0.0
        self.mu = float(opts.get("mu", 0.0))
        self._optimizer = None
        if method in ("fedadam", "fedyogi"):
            kind = "adam" if method == "fedadam" else "yogi"
            self._optimizer = ServerOptimizer(kind, self.server_lr, opts["beta1"], opts["beta2"], opts["tau"])

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
        layers, experts = self.layout.num_layers, self.layout.num_experts
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
            diagnostics.update(conflict_diagnostics(None, layers, experts))
            return AggregationResult(global_state=dict(global_state), diagnostics=diagnostics, failed=True)
        rd = self._prepare(global_state, accepted)
        if self.method == "local":
            rd.new_state = dict(global_state)
        elif self.method in ("fedadam", "fedyogi"):
            self._server_optimizer_round(rd)
        elif self.method in ("fedavg", "fedprox") and self.lowrank == "factor":
            self._fedavg_keys(rd, list(global_state))
        else:
            blocks = BlockRound(self.layout, self.method, self.options, self.server_lr, self.uses_retention, rd, round)
            handled = blocks.run()
            self._fedavg_keys(rd, [k for k in global_state if k not in handled])
            rd.new_state = {k: rd.new_state[k] for k in global_state}  # the input's key order
        with_cosine = self.method == "fcmoe"
        diagnostics.update(conflict_diagnostics(rd, layers, experts, with_cosine))
        if rd.truncation:
            diagnostics["truncation_error"] = {
                "max": max(rd.truncation),
                "mean": sum(rd.truncation) / len(rd.truncation),
            }
        return AggregationResult(
            rd.new_state,
            personalized=personalized_states(rd, self.method, self.uses_retention, self.retention_lambda),
            residuals=rd.residuals,
            weights=client_weights(rd, self.method, layers, experts),
            diagnostics=diagnostics,
        )

    def _prepare(self, global_state: State, accepted: list[ClientUpdate]) -> Round:
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
        if self.method not in MASKED:
            active = torch.ones_like(active)
        sizes = torch.tensor([float(u.num_examples) for u in accepted], dtype=torch.float64)
        return Round(accepted, global_state, sizes, counts, frequency, active)

    # ----------------------------------------------------------------- per-tensor methods
    def _fedavg_keys(self, rd: Round, keys: list[str]) -> None:
        weights = normalized_weights(rd.sizes.tolist())
        for key in keys:
            rd.new_state[key] = fedavg_tensor(
                rd.global_state[key], [u.state[key] for u in rd.updates], weights, self.server_lr
            )

    def _server_optimizer_round(self, rd: Round) -> None:
        weights = normalized_weights(rd.sizes.tolist())
        self._optimizer.steps += 1
        for key, tensor in rd.global_state.items():
            delta = mean_delta(tensor, [u.state[key] for u in rd.updates], weights)
            rd.new_state[key] = self._optimizer.step(key, tensor, delta)
