"""Publishing from a recipe, with TrainingArguments' names: `push_to_hub`, `hub_model_id`, `hub_private_repo`,
`hub_strategy` (`end`: after the last round; `every_save`: after every round, tagged `round-<t>`), `hub_token`.

The engine calls `publish_round` after each checkpointed round and `publish_run` after the final adapters are
written, on the main process only. Personalized adapters go up only when `hub_push_clients` names them.
"""

from __future__ import annotations

import shlex
from pathlib import Path


def _strategy(config) -> str:
    return str(getattr(config.hub_strategy, "value", config.hub_strategy))


def _push(config, root: Path, rounds: str, clients) -> None:
    from hf_fcmoe.hub.publisher import push_run

    report = push_run(
        root,
        config.hub_model_id,
        clients=clients,
        personalized_repo_id=config.hub_personalized_repo_id,
        rounds=rounds,
        private=bool(config.hub_private_repo),
        token=config.hub_token,
    )
    print(f"hub {config.hub_model_id}: {report.summary()}")


def publish_round(config, root: Path, round_index: int) -> None:
    """`hub_strategy: every_save`: push the rounds completed so far (the last one goes up with the final push)."""
    if config.push_to_hub and _strategy(config) == "every_save" and round_index < config.num_rounds:
        _push(config, Path(root), "all", None)


def publish_run(config, root: Path) -> None:
    """After the last round: the final global adapter (every round not yet pushed, under every_save) and the
    personalized adapters named by `hub_push_clients`."""
    if config.push_to_hub:
        _push(config, Path(root), "all" if _strategy(config) == "every_save" else "final", config.hub_push_clients)


def next_push_command(config) -> str:
    """The `hf-fcmoe push` command that shares a finished run (what the demo prints last)."""
    repo_id = config.hub_model_id or f"YOUR_NAME/{Path(config.output_dir).name}"
    return f"hf-fcmoe push {shlex.quote(str(config.output_dir))} --repo_id {repo_id}"


def check_publishing(config) -> None:
    """Before any training: a recipe that pushes must have a token and must not run offline (fail in seconds,
    not after the last round)."""
    if config.push_to_hub:
        from huggingface_hub import constants

        from hf_fcmoe.hub.publisher import resolve_endpoint, resolve_token

        endpoint = resolve_endpoint()
        if constants.is_offline_mode():
            raise ValueError(f"push_to_hub is set but HF_HUB_OFFLINE is too: unset it to push to {endpoint}")
        resolve_token(config.hub_token, endpoint)
