"""FedAvg done right: a per-tensor mean of client states weighted by examples."""

from __future__ import annotations

import pytest
import torch

from hf_fcmoe.adapters.layout import ExpertLayout
from hf_fcmoe.adapters.lora import build_lora_config, expert_layout_from_configs
from hf_fcmoe.aggregation import AggregationHub, ClientUpdate
from hf_fcmoe.models.families import FAMILIES, tiny_moe_config


@pytest.fixture(scope="module")
def layout() -> ExpertLayout:
    config = tiny_moe_config("mixtral")
    return expert_layout_from_configs(
        config, build_lora_config(FAMILIES["mixtral"], r=2, targets=["experts", "router"])
    )


def _state(layout: ExpertLayout, seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {key: torch.randn(shape, generator=generator) for key, shape in layout.expected_shapes().items()}


def _counts(layout: ExpertLayout) -> torch.Tensor:
    return torch.ones(layout.num_layers, layout.num_experts, dtype=torch.long)


def test_fedavg_of_one_client_is_that_client(layout):
    global_state, client = _state(layout, 0), _state(layout, 1)
    result = AggregationHub(layout, "fedavg").aggregate(global_state, [ClientUpdate("a", client, 10, _counts(layout))])
    for key in global_state:
        torch.testing.assert_close(result.global_state[key], client[key])


def test_fedavg_of_two_clients_is_the_example_weighted_mean(layout):
    global_state, first, second = _state(layout, 0), _state(layout, 1), _state(layout, 2)
    updates = [ClientUpdate("a", first, 30, _counts(layout)), ClientUpdate("b", second, 10, _counts(layout))]
    result = AggregationHub(layout, "fedavg").aggregate(global_state, updates)
    for key in global_state:
        torch.testing.assert_close(result.global_state[key], 0.75 * first[key] + 0.25 * second[key])
        assert result.global_state[key].dtype == global_state[key].dtype


def test_server_step_scales_the_mean_delta(layout):
    global_state, client = _state(layout, 0), _state(layout, 1)
    result = AggregationHub(layout, "fedavg", server_lr=0.5).aggregate(global_state, [ClientUpdate("a", client, 5)])
    for key in global_state:
        torch.testing.assert_close(
            result.global_state[key], global_state[key] + 0.5 * (client[key] - global_state[key])
        )
