"""Client faults of the in-process engine: a local round that raises, runs past its time limit or returns nothing
is dropped from the round with its reason; too few survivors retry the round or stop the run (recipe option).

Time limit semantics (``client_round_timeout``): a client cannot be preempted inside this process, so
`RoundDeadline` checks the clock at the end of every optimizer step and stops training once the limit is
passed; that client's update is then dropped (a partly trained update is not sent). A single step longer than
the limit is only noticed when it ends. A timed-out client makes the run depend on the machine's speed, so a
resumed run is bit-identical to an uninterrupted one only when no client timed out.

`crash_point` is the fault-injection hook of the crash tests: ``HF_FCMOE_CRASH_AT=<point>@<round>`` SIGKILLs the
process when it reaches that point of that round (points: ``train_step``, ``aggregated``, ``writing_round``,
``committed``).
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable, Iterable

from transformers import TrainerCallback

from hf_fcmoe.aggregation.types import ClientUpdate

CRASH_ENV = "HF_FCMOE_CRASH_AT"
CRASH_POINTS = ("train_step", "aggregated", "writing_round", "committed")


class RoundFailed(ValueError):
    """Too few clients finished (or were accepted in) a round; completed rounds stay on disk for --resume."""


def crash_point(name: str, round_index: int) -> None:
    """SIGKILL this process if ``HF_FCMOE_CRASH_AT`` names this point and round (test hook; no-op otherwise)."""
    wanted = os.environ.get(CRASH_ENV)
    if wanted and f"{name}@{round_index}" in wanted.split(","):
        os.kill(os.getpid(), signal.SIGKILL)


class RoundDeadline(TrainerCallback):
    """Stops a local round at the first step end past ``seconds`` (None: no limit) and marks it expired."""

    def __init__(self, seconds: float | None, round_index: int):
        self.seconds, self.round_index = seconds, round_index
        self.started = time.monotonic()
        self.expired = False
        self.steps = 0

    def on_step_end(self, args, state, control, **kwargs):
        self.steps += 1
        crash_point("train_step", self.round_index)
        if self.seconds is not None and time.monotonic() - self.started > self.seconds:
            self.expired = True
            control.should_training_stop = True
        return control


TrainClient = Callable[[str, list], "ClientUpdate | None"]


def run_client(
    client_id: str, train: TrainClient, round_index: int, time_limit: float | None
) -> tuple[ClientUpdate | None, str | None]:
    """One client's local round: ``(update, None)``, or ``(None, reason)`` when it has to be dropped."""
    deadline = RoundDeadline(time_limit, round_index)
    try:
        update = train(client_id, [deadline])
    except Exception as error:  # noqa: BLE001 - any failure of one client drops that client, not the round
        return None, f"local round raised {type(error).__name__}: {error}"
    if deadline.expired:
        return None, f"ran past the per-round time limit of {time_limit:g} s (stopped after {deadline.steps} steps)"
    if update is None:
        return None, "returned no update"
    if not isinstance(update, ClientUpdate):
        return None, f"returned a {type(update).__name__}, not a ClientUpdate"
    return update, None


def collect_round(
    sampled: Iterable[str], train: TrainClient, round_index: int, config
) -> tuple[list[ClientUpdate], dict[str, str]]:
    """Train every sampled client; drop the failed ones with their reasons.

    With fewer than ``config.min_clients_per_round`` successes: ``on_too_few_clients="retry"`` trains the failed
    clients again (same seeds; up to ``round_retries`` times: transient faults pass, deterministic ones repeat),
    ``"stop"`` (or retries used up) raises `RoundFailed`.
    """
    updates: dict[str, ClientUpdate] = {}
    dropped: dict[str, str] = {}
    order: list[str] = []
    pending = sampled  # the first pass iterates the caller's iterable (a progress bar), retries the failed ids
    attempts = 1 + (config.round_retries if config.on_too_few_clients == "retry" else 0)
    for _attempt in range(attempts):
        for cid in pending:
            if cid not in order:
                order.append(cid)
            update, reason = run_client(cid, train, round_index, config.client_round_timeout)
            if update is None:
                dropped[cid] = reason
            else:
                updates[cid] = update
                dropped.pop(cid, None)
        if len(updates) >= config.min_clients_per_round:
            break
        pending = [cid for cid in order if cid in dropped]
    else:
        raise RoundFailed(
            f"round {round_index}: only {len(updates)} of {len(order)} clients finished their local round, "
            f"min_clients_per_round={config.min_clients_per_round} ({attempts} attempt(s)); dropped: {dropped}. "
            "Completed rounds are kept: fix the clients and rerun with --resume"
        )
    return [updates[cid] for cid in order if cid in updates], dropped


def check_accepted(diagnostics: dict, config, round_index: int) -> None:
    """RoundFailed when the hub accepted fewer than ``min_clients_per_round`` updates (its verdicts are
    deterministic, so retrying the same updates cannot help)."""
    if diagnostics["num_accepted"] < config.min_clients_per_round:
        raise RoundFailed(
            f"round {round_index}: the hub accepted {diagnostics['num_accepted']} update(s), "
            f"min_clients_per_round={config.min_clients_per_round}; rejected: {diagnostics['rejected']}"
        )


def routed_token_bound(config, num_rows: int, top_k: int, world_size: int = 1) -> int | None:
    """The most tokens a client's local round can route through one MoE layer (None when unbounded).

    Every batch holds at most ``per_device_train_batch_size * world_size`` rows of at most ``max_length``
    tokens; each token goes to ``top_k`` experts. The number of batches is ``max_steps * gradient_accumulation``
    or, when training by epochs, ``ceil(epochs) * ceil(rows / batch)``.
    """
    if not config.max_length:
        return None
    batch = config.per_device_train_batch_size * world_size
    if config.max_steps and config.max_steps > 0:
        batches = config.max_steps * config.gradient_accumulation_steps
    else:
        batches = int(-(-config.num_train_epochs // 1)) * -(-num_rows // batch)
    return batches * batch * config.max_length * top_k
