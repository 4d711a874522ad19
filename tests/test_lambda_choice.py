"""Retention lambda chosen per client (`retention_lambda_grid`, issue 16): chosen on rows held out of the client's
own train split, recorded per round, and applied exactly: personalized = global + chosen lambda * residual."""

from __future__ import annotations

import json
import math

import pytest
import torch
from datasets import Dataset

from hf_fcmoe.federation.lambda_choice import (
    LOSSES_FIELD,
    PER_CLIENT_FIELD,
    LambdaChoice,
    choose_lambda,
    hold_out_validation,
)
from hf_fcmoe.federation.retention import add_scaled, scaled
from hf_fcmoe.federation.run_dir import RunDirectory, load_adapter_weights
from hf_fcmoe.federation.simulation import FederatedSimulation

GRID = [0.0, 0.5, 1.0]
# deviation target: a client's residual is its own trained experts minus the global, so on rows of its own
# distribution the validation loss falls towards lambda 1 (measured on this run: lambda 1 on every client)
AUTO = dict(
    aggregation_method="fcmoe", aggregation_options={"retention_target": "deviation"}, retention_lambda_grid=GRID
)


def _state(values: list[float]) -> dict[str, torch.Tensor]:
    return {"w": torch.tensor(values)}


def test_choose_lambda_takes_the_grid_minimum_not_the_default():
    global_state, residual = _state([0.0, 0.0]), _state([1.0, -2.0])
    target = add_scaled(global_state, residual, 0.8)  # the loss is lowest at lambda 0.8, off the grid

    def loss_of(state):
        return float(((state["w"] - target["w"]) ** 2).sum())

    assert choose_lambda(loss_of, global_state, residual, GRID).value == 1.0  # |0.2| beats |0.3| (0.5)
    fine = choose_lambda(loss_of, global_state, residual, [0.75, 0.25, 0.5, 0.0])
    assert fine.value == 0.75 and list(fine.losses) == [0.0, 0.25, 0.5, 0.75]
    assert fine.losses[0.75] == pytest.approx(loss_of(add_scaled(global_state, residual, 0.75)))
    # ties go to the smaller lambda; a NaN loss never wins; a zero residual costs one evaluation
    assert choose_lambda(lambda state: 1.0, global_state, residual, GRID).value == 0.0
    nan_at_zero = choose_lambda(lambda s: math.nan if not s["w"].any() else loss_of(s), global_state, residual, GRID)
    assert nan_at_zero.value == 1.0
    calls = []
    zero = choose_lambda(lambda s: calls.append(1) or 2.0, global_state, _state([0.0, 0.0]), GRID)
    assert zero.value == 0.0 and zero.losses == dict.fromkeys(GRID, 2.0) and len(calls) == 1


def test_choice_round_trips_through_flower_metrics():
    choice = LambdaChoice(0.25, {0.0: 3.0, 0.25: 2.5, 1.0: 2.75})
    assert LambdaChoice.from_metrics(choice.metrics()) == choice
    assert LambdaChoice.from_metrics({"eval_rows": 3}) is None


def test_validation_rows_are_held_out_of_training_seeded_and_disjoint(tiny_run_config):
    rows = Dataset.from_dict({"text": [f"row {i}" for i in range(40)]})
    config = tiny_run_config(**AUTO, retention_validation_fraction=0.25)
    train, validation = hold_out_validation(config, rows, "c0")
    again, validation_again = hold_out_validation(config, rows, "c0")
    assert len(validation) == 10 and len(train) == 30
    assert set(train["text"]).isdisjoint(validation["text"]) and set(train["text"]) | set(validation["text"]) == set(
        rows["text"]
    )
    assert validation["text"] == validation_again["text"] and train["text"] == again["text"]
    assert hold_out_validation(tiny_run_config(), rows, "c0") == (rows, None)  # no grid: nothing held out
    with pytest.raises(ValueError, match="'c0' has 1 training rows"):
        hold_out_validation(config, rows.select([0]), "c0")


@pytest.mark.parametrize(
    "overrides, match",
    [
        ({"retention_lambda_grid": GRID}, "needs aggregation_method 'fcmoe'"),
        ({**AUTO, "aggregation_options": {"retention": False}}, "retention on"),
        ({**AUTO, "retention_lambda": 0.0}, "retention_lambda > 0"),
        ({**AUTO, "retention_lambda_grid": [0.5, -1.0]}, "lambdas >= 0"),
        ({**AUTO, "retention_lambda_grid": []}, "lambdas >= 0"),
        ({**AUTO, "retention_validation_fraction": 1.0}, r"in \(0, 1\)"),
        ({"aggregation_method": "fcmoe", "retention_validation_fraction": 0.2}, "set retention_lambda_grid"),
    ],
)
def test_bad_lambda_grid_settings_are_one_line_errors(tiny_run_config, overrides, match):
    with pytest.raises(ValueError, match=match):
        tiny_run_config(**overrides)


@pytest.fixture(scope="module")
def auto_run(tmp_path_factory):
    from hf_fcmoe.config import load_config
    from tests.conftest import TINY_RUN

    out = tmp_path_factory.mktemp("lambda") / "auto"
    simulation = FederatedSimulation(load_config(overrides={**TINY_RUN, **AUTO, "output_dir": str(out)}))
    return simulation, simulation.run()


def test_every_client_records_the_grid_minimum_of_its_held_out_loss(auto_run):
    simulation, result = auto_run
    rows = result.metrics
    assert PER_CLIENT_FIELD not in rows[0]  # round 0: nobody holds a residual yet
    for row in rows[1:]:
        chosen, losses = row[PER_CLIENT_FIELD], row[LOSSES_FIELD]
        assert sorted(chosen) == simulation.data.client_ids
        for cid, value in chosen.items():
            per_lambda = {float(k): v for k, v in losses[cid].items()}
            assert sorted(per_lambda) == GRID
            assert value == min(per_lambda, key=lambda lam: (per_lambda[lam], lam))
    final = rows[-1][PER_CLIENT_FIELD]
    assert any(value != 0.5 for value in final.values()), final  # the grid's best is not the default here
    # the clients trained without their validation rows: num_examples is the train split minus the held-out slice
    stats = json.loads((result.output_dir / "rounds" / "1" / "clients" / "client_000" / "stats.json").read_text())
    train_rows = len(simulation.data.train["client_000"])
    assert stats["num_examples"] == train_rows - max(1, round(train_rows * 0.1))
    report = result.report_path.read_text()
    assert "## Retention lambda per client" in report and "held out of its own train split" in report


def test_personalized_adapter_is_global_plus_chosen_lambda_times_residual_exactly(auto_run):
    simulation, result = auto_run
    last = result.metrics[-1]
    global_state = load_adapter_weights(result.global_dir)
    residual_dir = result.output_dir / "rounds" / str(last["round"]) / "residuals"
    for cid, value in last[PER_CLIENT_FIELD].items():
        residual = RunDirectory.load_tensors(residual_dir / f"{cid}.safetensors")
        personalized = load_adapter_weights(result.personalized_dirs[cid])
        expected = add_scaled(global_state, residual, value)
        assert any(not torch.equal(personalized[k], global_state[k]) for k in global_state)
        for key in global_state:
            assert torch.equal(personalized[key], expected[key]), key
        # the next round would start from the same mix and report trained - lambda * residual
        retained = simulation.retained_part(cid)
        for key, tensor in scaled(residual, value).items():
            assert torch.equal(retained[key], tensor), key


def test_resume_continues_with_the_chosen_lambdas(auto_run, tiny_run_config):
    from hf_fcmoe.federation.simulation import run_simulation

    _, reference = auto_run
    first = tiny_run_config("resumed", **AUTO, num_rounds=1)
    run_simulation(first, progress=False)
    resumed = run_simulation(tiny_run_config("resumed", **AUTO), resume=True, progress=False)
    for got, expected in zip(resumed.metrics, reference.metrics):
        assert got.get(PER_CLIENT_FIELD) == expected.get(PER_CLIENT_FIELD)
        assert got["local_eval_loss"] == pytest.approx(expected["local_eval_loss"], rel=1e-6)


def test_model_cards_name_the_chosen_lambda(auto_run):
    from hf_fcmoe.hub.cards import render_card
    from hf_fcmoe.hub.plan import RunContents

    _, result = auto_run
    run = RunContents.read(result.output_dir)
    chosen = result.metrics[-1][PER_CLIENT_FIELD]["client_001"]
    common = dict(run=run, base_model_id="org/base", global_repo_id="org/global")
    personal = render_card(kind="personalized", repo_id="org/p", client_id="client_001", **common)
    assert f"| retention lambda | {chosen} |" in personal["README.md"].decode()
    card = render_card(kind="global", repo_id="org/global", round_index=run.last_round, **common)["README.md"]
    card = card.decode()
    assert "| retention lambda | chosen per client from [0.0, 0.5, 1.0] |" in card
