"""Every field FederatedMoEConfig adds to trl.SFTConfig is read by the code that runs: no setting is a no-op.

A field that is accepted and ignored lets a user believe a run did something it did not. This check reads
the package's source (attribute reads ``x.field`` and ``getattr(x, "field")`` outside the config's own
definition, validation and help modules) and fails for any added field nothing reads.
"""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

from trl import SFTConfig

from hf_fcmoe.config import FederatedMoEConfig

PACKAGE = Path(__file__).resolve().parents[1] / "hf_fcmoe"
# where fields are declared, validated and described: reading a field there does not make it do anything
NOT_USES = {"config.py", "config_checks.py", "config_fields.py"}
# Accepted today and implemented in open work; remove a name once its implementation lands (the second test
# below fails to remind you). Until then `engine: flower` / `push_to_hub_repo` are known no-ops (issue 15, item 1).
PENDING: dict[str, str] = {}


def added_fields() -> list[str]:
    inherited = {f.name for f in dataclasses.fields(SFTConfig)}
    return [f.name for f in dataclasses.fields(FederatedMoEConfig) if f.init and f.name not in inherited]


def names_read_by_the_package() -> set[str]:
    read: set[str] = set()
    for path in PACKAGE.rglob("*.py"):
        if path.relative_to(PACKAGE).as_posix() in NOT_USES:
            continue
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Load):
                read.add(node.attr)
            elif isinstance(node, ast.Call) and getattr(node.func, "id", None) in ("getattr", "hasattr"):
                if len(node.args) > 1 and isinstance(node.args[1], ast.Constant):
                    read.add(str(node.args[1].value))
    return read


def read_through_config_methods(read: set[str]) -> set[str]:
    """Fields read by the config's own properties/methods that the package uses (e.g. sampled_per_round)."""
    tree = ast.parse((PACKAGE / "config.py").read_text())
    (cls,) = [node for node in tree.body if isinstance(node, ast.ClassDef) and node.name == "FederatedMoEConfig"]
    through: set[str] = set()
    for method in cls.body:
        if isinstance(method, ast.FunctionDef) and not method.name.startswith("_") and method.name in read:
            for node in ast.walk(method):
                if isinstance(node, ast.Attribute) and getattr(node.value, "id", None) == "self":
                    through.add(node.attr)
    return through


def test_every_added_field_is_read_outside_the_config():
    read = names_read_by_the_package()
    read |= read_through_config_methods(read)
    unread = [name for name in added_fields() if name not in read and name not in PENDING]
    assert not unread, f"FederatedMoEConfig fields nothing reads (no-op settings): {unread}"


def test_pending_fields_are_still_unread():
    read = names_read_by_the_package()
    landed = sorted(name for name in PENDING if name in read)
    assert not landed, f"{landed} are read now: remove them from PENDING so the check covers them"


def test_the_check_catches_a_no_op_field():
    assert "lora_r" in names_read_by_the_package()
    assert "surely_not_a_field_anyone_reads" not in names_read_by_the_package()
