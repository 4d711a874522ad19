"""The aggregation hub: validates client updates and dispatches one aggregation method per round.

The only module here that knows `ClientUpdate` and `ExpertLayout`. The pieces, one job each:
`options` (methods, defaults, validation), `validation` (bad updates), `robust` (norm clipping, Krum, median:
malicious updates), `blocks` (the per-expert-block path,
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
from hf_fcmoe.aggregation.robust import clip_updates, krum_select, robust_mean_state
from hf_fcmoe.aggregation.rounds import Round
from hf_fcmoe.aggregation.server_opt import ServerOptimizer
from hf_fcmoe.aggregation.types import AggregationResult, ClientUpdate, State
from hf_fcmoe.aggregation.validation import UpdateLimits, check_client_id, partition_valid, update_fingerprint
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

    Robustness options (every method but ``local``; `hf_fcmoe.aggregation.robust` has the math and costs):
        norm_clip (fcmoe default 2.0, others None): clip each client's update of each expert block (and router,
            dense pair) to ``norm_clip x`` the median norm of that block's updates this round; None: off.
        robust_aggregator (default None): ``"krum"`` (Multi-Krum drops ``byzantine_clients`` clients before the
            method runs), ``"median"`` / ``"trimmed_mean"`` (fedavg/fedprox: coordinate-wise, ``trim_fraction``).
        byzantine_clients (default 1), trim_fraction (default 0.2).

    Validation (`hf_fcmoe.aggregation.validation`) runs before anything touches the global state: a bad update is
    rejected with a reason naming the client (``diagnostics["rejected"]``) and the round goes on with the others.
    ``max_num_examples`` caps any client's claimed size; `enroll` records each client's declared size and
    routed-token bound; `announce` makes every update carry this round's config fingerprint. An exception (or a
    non-finite result) inside a method's math is traced to the client(s) whose update causes it, which are
    rejected, and the round is redone without them.

    Client activity: a client is active on expert (l, e) when ``expert_counts[l, e] > 0``; a client that sent
    no counts is treated as active on every expert with uniform frequency.
    """

    def __init__(
        self,
        layout: ExpertLayout,
        method: str = "fedavg",
        server_lr: float = 1.0,
        max_num_examples: int | None = None,
        **options,
    ):
        if max_num_examples is not None and (isinstance(max_num_examples, bool) or not max_num_examples > 0):
            raise ValueError(f"max_num_examples must be a positive integer or None, got {max_num_examples!r}")
        self.layout = layout
        self.max_num_examples = max_num_examples
        self.declared_sizes: dict[str, int] = {}
        self.token_bounds: dict[str, int] = {}
        self._announced: tuple[dict, dict] | None = None
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

    # ----------------------------------------------------------------- what the server knows of its clients
    def enroll(self, client_id: str, num_examples: int, max_routed_tokens: int | None = None) -> None:
        """Record a client's declared training-set size (and routed-token bound per layer and round).

        Once any client is enrolled, updates from clients that were not are rejected, and ``num_examples`` above
        the declared size is rejected. ValueError for an unsafe id or a non-positive size.
        """
        check_client_id(client_id)
        if isinstance(num_examples, bool) or not isinstance(num_examples, int) or num_examples <= 0:
            raise ValueError(f"client {client_id!r}: declared size must be a positive integer, got {num_examples!r}")
        self.declared_sizes[client_id] = num_examples
        if max_routed_tokens is not None:
            self.token_bounds[client_id] = int(max_routed_tokens)

    def announce(self, base_config: dict, lora_config: dict) -> None:
        """Announce the base model config and LoRA config clients train from (``config.to_dict()`` of each);
        from then on every update must carry `update_fingerprint(base_config, lora_config, round)`."""
        self._announced = (dict(base_config), dict(lora_config))

    def fingerprint(self, round: int) -> str | None:
        """The fingerprint updates of ``round`` must carry (None when nothing was announced)."""
        return None if self._announced is None else update_fingerprint(*self._announced, round)

    def _limits(self, round: int | None) -> UpdateLimits:
        if self._announced is not None and round is None:
            raise ValueError("a fingerprint was announced: pass round= to aggregate so updates can be checked")
        return UpdateLimits(
            self.max_num_examples,
            self.declared_sizes,
            self.token_bounds,
            None if round is None else self.fingerprint(round),
        )

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
        accepted, rejected = partition_valid(updates, global_state, self.layout, self._limits(round))
        accepted = sorted(accepted, key=lambda u: u.client_id)
        diagnostics: dict = {"round": round, "method": self.method, "rejected": rejected}
        if self.lowrank != "factor":
            diagnostics["lowrank"] = self.lowrank
        rd = self._merge_isolating(global_state, accepted, round, diagnostics) if accepted else None
        diagnostics["num_accepted"] = len(rd.updates) if rd is not None else 0
        if rd is None:
            diagnostics.update(conflict_diagnostics(None, layers, experts))
            return AggregationResult(global_state=dict(global_state), diagnostics=diagnostics, failed=True)
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

    def _merge(self, global_state: State, accepted: list[ClientUpdate], round: int | None, diagnostics: dict) -> Round:
        """Robust pre-steps (Krum, norm clipping), then the method; raises if the result is not finite."""
        opts = self.options
        if opts.get("robust_aggregator") == "krum":
            accepted, excluded, note = krum_select(accepted, global_state, opts["byzantine_clients"])
            diagnostics["krum_excluded"] = excluded
            if note:
                diagnostics["krum_note"] = note
        if opts.get("norm_clip") is not None:
            accepted, clipped = clip_updates(accepted, global_state, self.layout, opts["norm_clip"])
            diagnostics["clipped"] = clipped
        rd = self._prepare(global_state, accepted)
        if self.method == "local":
            rd.new_state = dict(global_state)
        elif opts.get("robust_aggregator") in ("median", "trimmed_mean"):
            rd.new_state = robust_mean_state(
                global_state, rd.updates, opts["robust_aggregator"], opts["trim_fraction"], self.server_lr
            )
        elif self.method in ("fedadam", "fedyogi"):
            self._server_optimizer_round(rd)
        elif self.method in ("fedavg", "fedprox") and self.lowrank == "factor":
            self._fedavg_keys(rd, list(global_state))
        else:
            blocks = BlockRound(self.layout, self.method, self.options, self.server_lr, self.uses_retention, rd, round)
            handled = blocks.run()
            self._fedavg_keys(rd, [k for k in global_state if k not in handled])
            rd.new_state = {k: rd.new_state[k] for k in global_state}  # the input's key order
        for name, state in [("global", rd.new_state), *((f"residual of {c}", r) for c, r in rd.residuals.items())]:
            bad = next((k for k, t in state.items() if not bool(torch.isfinite(t).all())), None)
            if bad is not None:
                raise FloatingPointError(f"the {name} state came out non-finite at {bad}")
        return rd

    def _merge_isolating(
        self, global_state: State, accepted: list[ClientUpdate], round: int | None, diagnostics: dict
    ) -> Round | None:
        """`_merge`, and if it raises: find the client(s) whose update makes it fail, reject them, merge the rest.

        A client is to blame when merging its update alone fails, or (when no single update fails) when the round
        fails with it and succeeds without it. The hub's server-optimizer state is restored between attempts.
        Returns None (the round fails, the global stays) when the failure cannot be traced to one client.
        """
        snapshot = self._snapshot()
        try:
            return self._merge(global_state, accepted, round, diagnostics)
        except Exception as error:  # noqa: BLE001 - any failure of the math is one client's rejection
            first = f"{type(error).__name__}: {error}"
        culprits: dict[str, str] = {}
        for update in accepted:
            self._restore(snapshot)
            try:
                self._merge(global_state, [update], round, {})
            except Exception as error:  # noqa: BLE001
                culprits[update.client_id] = f"{type(error).__name__}: {error}"
        if not culprits and len(accepted) > 2:
            for update in accepted:
                self._restore(snapshot)
                try:
                    self._merge(global_state, [u for u in accepted if u is not update], round, {})
                except Exception:  # noqa: BLE001
                    continue
                culprits[update.client_id] = f"the round fails with it and succeeds without it ({first})"
            culprits = culprits if len(culprits) == 1 else {}
        self._restore(snapshot)
        rejected = diagnostics["rejected"]
        if not culprits:
            diagnostics["error"] = f"aggregation failed and no single client could be blamed: {first}"
            return None
        for cid, reason in culprits.items():
            rejected[cid] = f"client {cid!r}: aggregating its update failed: {reason}"
        remaining = [u for u in accepted if u.client_id not in culprits]
        if not remaining:
            return None
        try:
            return self._merge(global_state, remaining, round, diagnostics)
        except Exception as error:  # noqa: BLE001
            self._restore(snapshot)
            diagnostics["error"] = f"aggregation failed without the rejected clients too: {type(error).__name__}"
            return None

    def _snapshot(self):
        opt = self._optimizer
        return None if opt is None else (opt.steps, dict(opt.m), dict(opt.v))

    def _restore(self, snapshot) -> None:
        if snapshot is not None:
            self._optimizer.steps, m, v = snapshot
            self._optimizer.m, self._optimizer.v = dict(m), dict(v)

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
