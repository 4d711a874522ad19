"""What an engine does around each client so the hub can check it: enrolment, fingerprints, client-side DP.

Server side, `enroll_clients` tells the hub each client's declared size (its training rows) and routed-token
bound, so a client cannot claim more data than it has. Client side, `finish_update` stamps the update with the
fingerprint of the configs it trained from and, when the recipe asks for it, privatizes it
(`hf_fcmoe.federation.privacy`). Both engines call these; nothing here knows how updates travel.
"""

from __future__ import annotations

from collections.abc import Callable

from hf_fcmoe.aggregation.types import ClientUpdate, State
from hf_fcmoe.aggregation.validation import check_client_id, update_fingerprint
from hf_fcmoe.federation.faults import routed_token_bound
from hf_fcmoe.federation.privacy import epsilon, privatize_update


def enroll_clients(hub, config, rows_per_client: dict[str, int], top_k: int, world_size: int = 1) -> None:
    """Enroll every client with its declared size and routed-token bound (ValueError on an unsafe id)."""
    for cid, rows in rows_per_client.items():
        check_client_id(cid)
        hub.enroll(cid, int(rows), routed_token_bound(config, int(rows), top_k, world_size))


def finish_update(
    update: ClientUpdate,
    global_state: State,
    config,
    base_config: dict,
    lora_config: dict,
    round_index: int,
    seed: int,
) -> ClientUpdate:
    """Client side, before sending: apply client-side DP (if configured) and stamp the config fingerprint."""
    if config.dp_noise_multiplier is not None:
        update = privatize_update(update, global_state, config.dp_clip_norm, config.dp_noise_multiplier, seed)
    update.fingerprint = update_fingerprint(base_config, lora_config, round_index)
    return update


def dp_metrics(config, sampled_by_round: Callable[[int], list[str]], round_index: int) -> dict:
    """``dp_epsilon_round`` (one round of one client) and ``dp_epsilon`` (cumulative, the most-sampled client)."""
    if config.dp_noise_multiplier is None or round_index == 0:
        return {}
    counts: dict[str, int] = {}
    for t in range(1, round_index + 1):
        for cid in sampled_by_round(t):
            counts[cid] = counts.get(cid, 0) + 1
    sigma, delta = config.dp_noise_multiplier, config.dp_delta
    return {
        "dp_epsilon_round": epsilon(sigma, 1, delta),
        "dp_epsilon": epsilon(sigma, max(counts.values()), delta),
        "dp_delta": delta,
    }
