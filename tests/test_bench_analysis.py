"""Pure benchmark math: summaries, rounds to target, paired differences, reference choice."""

from __future__ import annotations

import math

import pytest

from hf_fcmoe.bench.analysis import (
    ACCURACY,
    LOSS,
    best_method,
    paired_difference,
    rounds_to_target,
    summarize_run,
)


def _rows(globals_, locals_=None, conflicts=None):
    locals_ = locals_ or globals_
    return [
        {
            "round": i,
            "method": "fcmoe",
            "global_eval_loss": g,
            "local_eval_loss": loc,
            "local_eval_loss_std": 0.1 * i,
            "bytes_up": 1_000_000 * (i > 0),
            "bytes_down": 500_000 * (i > 0),
            **({"conflict_rate": conflicts[i]} if conflicts and conflicts[i] is not None else {}),
        }
        for i, (g, loc) in enumerate(zip(globals_, locals_))
    ]


def test_rounds_to_target_skips_round_zero_and_respects_direction():
    assert rounds_to_target([1.0, 3.0, 2.0, 0.9], 1.0, LOSS) == 3
    assert rounds_to_target([0.5, 3.0], 1.0, LOSS) is None  # round 0 reaching it does not count
    assert rounds_to_target([0.1, 0.5, 0.8], 0.7, ACCURACY) == 2


def test_summary_of_a_run():
    rows = _rows([3.0, 2.0, 1.0], [3.0, 1.5, 0.5], conflicts=[None, 0.2, 0.4])
    summary = summarize_run(list(reversed(rows)), LOSS, target=1.5)  # row order does not matter
    assert summary.final_global == 1.0 and summary.final_local == 0.5
    assert summary.auc == pytest.approx(1.5)  # mean over rounds 1..R, round 0 excluded
    assert summary.rounds_to_target == 2
    assert summary.megabytes == pytest.approx(3.0)
    assert summary.conflict_rate == pytest.approx(0.3)
    assert summary.local_client_std == pytest.approx(0.2)
    assert summarize_run(_rows([3.0, 2.0]), LOSS).conflict_rate is None
    fedavg = [{**row, "method": "fedavg"} for row in rows]
    assert summarize_run(fedavg, LOSS).conflict_rate is None  # only FC-MoE measures conflicts


def test_paired_difference_is_positive_when_the_method_is_better():
    method = {0: 1.0, 1: 2.0, 2: 3.1}
    reference = {0: 1.5, 1: 2.5, 2: 3.0, 3: 9.0}  # seed 3 has no partner and is ignored
    diff = paired_difference(method, reference, LOSS)
    assert diff.seeds == 3 and diff.wins == 2
    assert diff.mean == pytest.approx((0.5 + 0.5 - 0.1) / 3)
    acc = paired_difference({0: 0.8}, {0: 0.7}, ACCURACY)
    assert acc.mean == pytest.approx(0.1) and acc.std == 0.0 and acc.wins == 1


def test_best_method_follows_the_direction():
    finals = {"fedavg@1": [2.0, 2.2], "fedavg@2": [1.9, 2.0]}
    assert best_method(finals, LOSS) == "fedavg@2"
    assert best_method({"a": [0.5], "b": [0.6]}, ACCURACY) == "b"
    with pytest.raises(ValueError):
        best_method({}, LOSS)


def test_nan_free_single_seed():
    diff = paired_difference({0: 1.0}, {0: 1.0}, LOSS)
    assert diff.mean == 0.0 and diff.wins == 0 and not math.isnan(diff.std)
