"""Personalization baselines of the engine: what a client keeps of its own besides the global adapter.

FC-MoE personalizes through the hub (retained residuals). These are the standard alternatives it must beat,
each producing per-client adapters through the same run directory (``residuals/``, ``personalized/<id>/``),
stored as ``residual = personal - global`` so the engine's ``personalized = global + residual`` holds:

- ``finetune``: FedAvg (or any hub method) then, after the last round, every client fine-tunes the final
  global adapter on its own train split for one round's step budget (``max_steps``).
- ``ditto`` (Li et al. 2021): besides its usual round, every sampled client trains a personal adapter from
  its previous one with the proximal term ``mu/2 ||w_p - w_g||^2`` towards the round's global (the trainer's
  FedProx mechanism anchored at the global); it costs a second local round per client.
- ``personal_router``: experts (and dense LoRA) are federated, each client's router LoRA stays its own: a
  client starts from the global experts with its router and reports ``trained - retained`` for the router,
  so the hub's router update is local progress only (the MoE-native way to personalize).
"""

from __future__ import annotations

from hf_fcmoe.adapters.layout import ExpertLayout
from hf_fcmoe.aggregation.outputs import shared_zeros
from hf_fcmoe.aggregation.types import ClientUpdate, State

PERSONALIZATIONS = ("finetune", "ditto", "personal_router")
DITTO_DEFAULT_MU = 0.1
PERSONAL_SEED_OFFSET = 500_000  # personal rounds draw other batches than the same client's global round


def check_personalization(config) -> None:
    """One-line errors for personalization settings that cannot work together."""
    mode = config.personalization
    if mode is None:
        if config.personalization_mu is not None:
            raise ValueError("personalization_mu is Ditto's proximal weight: set personalization: ditto to use it")
        return
    if mode not in PERSONALIZATIONS:
        raise ValueError(f"unknown personalization {mode!r}; available: {', '.join(PERSONALIZATIONS)}")
    if config.personalization_mu is not None and mode != "ditto":
        raise ValueError(f"personalization_mu is Ditto's proximal weight; personalization is {mode!r}")
    if config.personalization_mu is not None and config.personalization_mu < 0:
        raise ValueError(f"personalization_mu must be >= 0, got {config.personalization_mu}")
    if config.aggregation_method == "local":
        raise ValueError(f"personalization {mode!r} needs a federated aggregation_method, not 'local'")
    retention = config.aggregation_options.get("retention", True)
    if config.aggregation_method == "fcmoe" and retention:
        raise ValueError(
            f"personalization {mode!r} replaces FC-MoE's retention: set aggregation_options.retention: false"
        )


def _difference(a: State, b: State) -> State:
    return {key: a[key].float() - b[key].float() for key in a}


class Personalizer:
    """The engine's hooks for one personalization mode (see the module docstring)."""

    def __init__(self, config, worker, layout: ExpertLayout):
        self.mode = config.personalization
        self.config, self.worker = config, worker
        self.mu = DITTO_DEFAULT_MU if config.personalization_mu is None else float(config.personalization_mu)
        self.router_keys = {key for pair in layout.by_kind("router") for key in (pair.a_key, pair.b_key)}
        if self.mode == "personal_router" and not self.router_keys:
            raise ValueError("personalization 'personal_router' needs a router LoRA: add 'router' to lora_targets")

    def retained(self, residual: State | None) -> State | None:
        """What a client's start state adds to the global and its report takes back out (personal router only)."""
        if self.mode != "personal_router" or residual is None:
            return None
        return {key: residual[key].float() for key in self.router_keys}

    @staticmethod
    def start_state(global_state: State, retained: State | None) -> State:
        """global + retained on the retained keys (the personal router), the global elsewhere."""
        if retained is None:
            return global_state
        return {
            key: (tensor.float() + retained[key]).to(tensor.dtype) if key in retained else tensor
            for key, tensor in global_state.items()
        }

    def after_round(
        self,
        round_index: int,
        old_global: State,
        new_global: State,
        updates: list[ClientUpdate],
        residuals: dict[str, State],
        splits: dict,
        client_ids: list[str],
    ) -> dict[str, State]:
        """The residuals after this round (every client's, relative to ``new_global``)."""
        if self.mode == "finetune":
            if round_index < self.config.num_rounds:
                return residuals
            return {cid: self._finetune(cid, new_global, splits, client_ids) for cid in client_ids}
        rebased = {cid: self._rebase(residual, old_global, new_global) for cid, residual in residuals.items()}
        for update in updates:
            cid = update.client_id
            if self.mode == "ditto":
                seed = self._seed(round_index, cid, client_ids)
                rebased[cid] = self._ditto(cid, old_global, new_global, residuals.get(cid), splits[cid], seed)
            else:
                rebased[cid] = self._router_residual(update, residuals.get(cid), new_global)
        return rebased

    # ----------------------------------------------------------------- the modes
    def _seed(self, round_index: int, cid: str, client_ids: list[str]) -> int:
        from hf_fcmoe.federation.client import round_seed

        return round_seed(self.config.seed, round_index, client_ids.index(cid)) + PERSONAL_SEED_OFFSET

    def _rebase(self, residual: State, old_global: State, new_global: State) -> State:
        """Keep a client's personal adapter where it was while the global moves (residual += old - new)."""
        if self.mode == "personal_router":
            zeros = shared_zeros(new_global)
            return {
                key: residual[key].float() + old_global[key].float() - new_global[key].float()
                if key in self.router_keys
                else zeros[key]
                for key in new_global
            }
        return {key: residual[key].float() + old_global[key].float() - new_global[key].float() for key in new_global}

    def _finetune(self, cid: str, global_state: State, splits: dict, client_ids: list[str]) -> State:
        seed = self._seed(self.config.num_rounds + 1, cid, client_ids)
        trained = self.worker.train(cid, splits[cid], global_state, seed=seed).state
        return _difference(trained, global_state)

    def _ditto(self, cid: str, old_global: State, new_global: State, residual: State | None, split, seed: int):
        """One personal round from w_p with ``mu/2 ||w_p - w_g||^2`` towards the round's global w_g."""
        from transformers import PrinterCallback

        from hf_fcmoe.training.trainer import FederatedMoETrainer, load_adapter_state

        personal = old_global if residual is None else {k: old_global[k] + residual[k] for k in old_global}
        args = self.worker.local_args(seed)
        args.proximal_mu = self.mu
        trainer = FederatedMoETrainer(
            self.worker.model,
            args=args,
            train_dataset=split.train,
            processing_class=self.worker.tokenizer,
            client_id=cid,
            start_state=old_global,  # the FedProx anchor is the state the trainer starts from: the global
        )
        trainer.remove_callback(PrinterCallback)
        load_adapter_state(trainer.model, personal)  # then train from w_p
        return _difference(trainer.train_round().state, new_global)

    def _router_residual(self, update: ClientUpdate, residual: State | None, new_global: State) -> State:
        """own router = reported + retained; stored relative to the new global; zero elsewhere."""
        zeros = shared_zeros(new_global)
        out = dict(zeros)
        for key in self.router_keys:
            own = update.state[key].float() + (residual[key].float() if residual is not None else 0.0)
            out[key] = own - new_global[key].float()
        return out


def build_personalizer(config, worker, layout: ExpertLayout) -> Personalizer | None:
    """The run's personalizer, or None when the hub's own personalization (FC-MoE retention, local) applies."""
    check_personalization(config)
    return None if config.personalization is None else Personalizer(config, worker, layout)
