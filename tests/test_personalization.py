"""Personalization baselines end to end on a tiny run: finetune, ditto, personal_router (issue 16)."""

from __future__ import annotations

import pytest
import torch

from hf_fcmoe.federation.run_dir import load_adapter_weights
from hf_fcmoe.federation.simulation import run_simulation

FAST = dict(num_rounds=2, max_steps=2, num_clients=2, num_examples=96, aggregation_method="fedavg")


def _router_keys(state):
    return {key for key in state if ".mlp.gate." in key}


def _load(result):
    global_state = load_adapter_weights(result.global_dir)
    personal = {cid: load_adapter_weights(path) for cid, path in result.personalized_dirs.items()}
    return global_state, personal


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    from hf_fcmoe.config import load_config
    from tests.conftest import TINY_RUN

    out = tmp_path_factory.mktemp("pers") / "fedavg"
    return run_simulation(load_config(overrides={**TINY_RUN, **FAST, "output_dir": str(out)}), progress=False)


def test_finetune_personalizes_only_after_the_last_round(tiny_run_config, reference):
    result = run_simulation(tiny_run_config("ft", **FAST, personalization="finetune"), progress=False)
    rows, plain = result.metrics, reference.metrics
    assert rows[-1]["global_eval_loss"] == pytest.approx(plain[-1]["global_eval_loss"])  # the global is FedAvg's
    assert rows[1]["local_eval_loss"] == pytest.approx(plain[1]["local_eval_loss"])  # no personal state yet
    assert rows[-1]["local_eval_loss"] < plain[-1]["local_eval_loss"]  # fine-tuned on its own split
    global_state, personal = _load(result)
    for state in personal.values():
        assert any(not torch.equal(state[k], global_state[k]) for k in global_state)


def test_ditto_keeps_a_personal_adapter_and_leaves_the_global_alone(tiny_run_config, reference):
    result = run_simulation(
        tiny_run_config("ditto", **FAST, personalization="ditto", personalization_mu=0.1), progress=False
    )
    assert result.metrics[-1]["global_eval_loss"] == pytest.approx(reference.metrics[-1]["global_eval_loss"])
    global_state, personal = _load(result)
    for state in personal.values():
        assert any(not torch.equal(state[k], global_state[k]) for k in global_state)
    assert result.metrics[1]["local_eval_loss"] != pytest.approx(reference.metrics[1]["local_eval_loss"])


def test_personal_router_differs_from_the_global_on_router_keys_only(tiny_run_config):
    result = run_simulation(tiny_run_config("router", **FAST, personalization="personal_router"), progress=False)
    global_state, personal = _load(result)
    routers = _router_keys(global_state)
    assert routers
    for state in personal.values():
        for key in global_state:
            if key in routers:
                continue
            torch.testing.assert_close(state[key], global_state[key], msg=key)
        assert any(not torch.equal(state[k], global_state[k]) for k in routers)


def test_bad_personalization_settings_are_named(tiny_run_config):
    with pytest.raises(ValueError, match="bogus"):
        run_simulation(tiny_run_config("bad1", **FAST, personalization="bogus"), progress=False)
    with pytest.raises(ValueError, match="personalization_mu"):
        run_simulation(tiny_run_config("bad2", **FAST, personalization_mu=0.1), progress=False)
    with pytest.raises(ValueError, match="retention"):
        run_simulation(
            tiny_run_config("bad3", **{**FAST, "aggregation_method": "fcmoe"}, personalization="ditto"),
            progress=False,
        )
