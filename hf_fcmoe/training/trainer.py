"""`FederatedMoETrainer`: one client's local round as a `trl.SFTTrainer`.

Why SFTTrainer and not a bare Trainer: clients hold data in every TRL format (plain text,
prompt/completion with completion-only loss, chat messages through the tokenizer's chat template),
and SFTTrainer already tokenizes, truncates and collates all of them the way users expect. The
federated parts are small overrides that call `super()`:

- the round starts from a given adapter state (global, or global + lambda * residual for FC-MoE's
  local knowledge retention);
- `ExpertUsageCallback` counts routed tokens per (layer, expert);
- an optional FedProx proximal term mu/2 * ||theta - theta_start||^2 on the trainable LoRA tensors;
- `train_round()` returns a `ClientUpdate` whose state has the retained part taken back out, so the
  server sees local progress only.
"""

from __future__ import annotations

import torch
from peft import PeftModel, get_peft_model_state_dict, set_peft_model_state_dict
from trl import SFTTrainer

from hf_fcmoe.aggregation.types import ClientUpdate, State
from hf_fcmoe.models.families import assert_moe_model
from hf_fcmoe.training.callbacks import ExpertUsageCallback
from hf_fcmoe.training.expert_lora import configure_expert_lora_forward


def adapter_state(model: PeftModel) -> State:
    """A detached CPU copy of the model's adapter state (PEFT's saved keys)."""
    return {key: tensor.detach().cpu().clone() for key, tensor in get_peft_model_state_dict(model).items()}


def load_adapter_state(model: PeftModel, state: State) -> None:
    """Load an adapter state into the model, failing loudly on any key that does not fit."""
    result = set_peft_model_state_dict(model, state)
    unexpected = getattr(result, "unexpected_keys", [])
    if unexpected:
        raise ValueError(f"adapter state has keys the model does not: {unexpected[:3]}")


class FederatedMoETrainer(SFTTrainer):
    """Train one client's round of federated per-expert LoRA and report a `ClientUpdate`.

    Args (besides SFTTrainer's):
        client_id: name reported to the server.
        start_state: adapter state the round starts from (None: keep the model's current adapter).
        retained: the client's retained residual scaled by lambda (already in ``start_state``); it is
            subtracted from the trained state before reporting.
    `args.proximal_mu` (a `FederatedMoEConfig` field; 0 for a plain SFTConfig) turns on FedProx.
    `args.expert_lora_forward` ("routed" unless set) picks the expert LoRA forward (training/expert_lora.py).
    """

    def __init__(
        self,
        model: PeftModel,
        *args,
        client_id: str = "client",
        start_state: State | None = None,
        retained: State | None = None,
        callbacks=None,
        **kwargs,
    ):
        if not isinstance(model, PeftModel):
            raise TypeError("FederatedMoETrainer trains a PeftModel with per-expert LoRA (see apply_expert_lora)")
        assert_moe_model(model.get_base_model())
        if start_state is not None:
            load_adapter_state(model, start_state)
        self.client_id = client_id
        self.retained = retained
        self.usage = ExpertUsageCallback()
        super().__init__(model, *args, callbacks=[self.usage, *(callbacks or [])], **kwargs)
        configure_expert_lora_forward(model, getattr(self.args, "expert_lora_forward", "routed"))
        self.proximal_mu = float(getattr(self.args, "proximal_mu", 0.0) or 0.0)
        self._anchor = {
            name: param.detach().clone() for name, param in self.model.named_parameters() if param.requires_grad
        }

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        output = super().compute_loss(
            model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
        )
        if self.proximal_mu <= 0:
            return output
        loss, outputs = output if return_outputs else (output, None)
        loss = loss + 0.5 * self.proximal_mu * self.proximal_term(model)
        return (loss, outputs) if return_outputs else loss

    def proximal_term(self, model) -> torch.Tensor:
        """||theta - theta_start||^2 over the trainable (LoRA) parameters."""
        unwrapped = self.accelerator.unwrap_model(model)
        terms = [
            (param - self._anchor[name].to(param.device)).pow(2).sum()
            for name, param in unwrapped.named_parameters()
            if name in self._anchor
        ]
        return torch.stack(terms).sum()

    def train_round(self, **train_kwargs) -> ClientUpdate:
        """Run `train()` and package the result for the server."""
        output = self.train(**train_kwargs)
        state = adapter_state(self.accelerator.unwrap_model(self.model))
        if self.retained is not None:
            state = {
                key: tensor - self.retained[key].to(tensor.dtype) if key in self.retained else tensor
                for key, tensor in state.items()
            }
        return ClientUpdate(
            client_id=self.client_id,
            state=state,
            num_examples=len(self.train_dataset),
            expert_counts=self.usage.counts,
            train_loss=float(output.training_loss),
            metrics={"global_step": int(output.global_step)},
        )
