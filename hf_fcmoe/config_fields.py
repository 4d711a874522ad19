"""What a recipe key may be: known field names (with a "did you mean"), value types, grouped `--help` text.

Pure Python on dataclass fields (no HF import), shared by every YAML-backed config (`FederatedMoEConfig`,
`BenchConfig`, `UpcycleConfig`): HfArgumentParser.parse_dict builds a dataclass without checking types, so
``--num_rounds abc`` would otherwise surface as a TypeError deep in validation.
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import re
import types
import typing
from collections.abc import Iterable
from pathlib import Path
from typing import Any

_MISSING = dataclasses.MISSING


def init_fields(cls: type) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls) if f.init}


def check_known_keys(cls: type, keys: Iterable[str], where: str, prefix: str = "") -> None:
    """ValueError naming the first unknown key, where it came from, and the closest field name."""
    known = init_fields(cls)
    unknown = [key for key in keys if key not in known]
    if not unknown:
        return
    key = unknown[0]
    # the fields this class adds first: `lora_rank` should suggest our `lora_r`, not TrainingArguments' `local_rank`
    own = [name for name in getattr(cls, "__annotations__", {}) if name in known]
    close = difflib.get_close_matches(key, own, n=1, cutoff=0.6) or difflib.get_close_matches(
        key, list(known), n=1, cutoff=0.6
    )
    hint = f"; did you mean {prefix}{close[0]}?" if close else f"; see the fields with --help ({cls.__name__})"
    more = f" (and {len(unknown) - 1} more: {unknown[1:]})" if len(unknown) > 1 else ""
    raise ValueError(f"unknown key {prefix}{key} in {where}{more}{hint}")


def resolved_types(cls: type) -> dict[str, Any]:
    try:
        return typing.get_type_hints(cls)
    except Exception:  # an annotation that does not resolve: skip type checks rather than guess
        return {}


def float_kind(annotation: Any) -> str | None:
    """The float fields: "float" for ``float`` or ``float | None``, "list[float]" for a list of floats, else None."""
    args = [arg for arg in typing.get_args(annotation) if arg is not type(None)]
    if typing.get_origin(annotation) in (typing.Union, types.UnionType) and len(args) == 1:
        annotation = args[0]
    if annotation is float:
        return "float"
    if typing.get_origin(annotation) is list and typing.get_args(annotation) == (float,):
        return "list[float]"
    return None


def _accepts(annotation: Any, value: Any) -> bool | None:
    """True/False when `value` fits/does not fit `annotation`; None when the annotation is not checked."""
    if annotation is Any:
        return True
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        verdicts = [_accepts(arg, value) for arg in typing.get_args(annotation)]
        return True if any(v is not False for v in verdicts) else False
    if origin is typing.Literal:
        return value in typing.get_args(annotation)
    if annotation is type(None):
        return value is None
    if annotation is bool:
        return isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is str:
        return isinstance(value, str)
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        return isinstance(value, (str, annotation))
    if origin in (list, tuple) or annotation in (list, tuple):
        return isinstance(value, (list, tuple))
    if origin is dict or annotation is dict:
        return isinstance(value, dict)
    return None


def type_name(annotation: Any) -> str:
    text = getattr(annotation, "__name__", None) if not typing.get_args(annotation) else None
    text = text or str(annotation).replace("typing.", "")
    return {"int": "an integer", "float": "a number", "bool": "true or false", "str": "a string"}.get(text, text)


def check_value_types(cls: type, values: dict[str, Any], where_of: dict[str, str]) -> None:
    """ValueError naming the first value whose type does not fit its field (and where it was set)."""
    hints = resolved_types(cls)
    for key, value in values.items():
        annotation = hints.get(key)
        if annotation is not None and _accepts(annotation, value) is False:
            raise ValueError(f"{key} must be {type_name(annotation)}, got {value!r} ({where_of.get(key, 'config')})")


def read_yaml_mapping(path: str | Path, what: str) -> dict[str, Any]:
    """A recipe file as a dict; one-line errors for a missing file, a YAML syntax error or a non-mapping."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"recipe {path} does not exist")
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise ValueError(f"recipe {path} is not valid YAML{at}: {problem}") from None
    if not isinstance(values, dict):
        raise ValueError(f"recipe {path} must be a YAML mapping of {what} fields")
    return values


# --- help text
def topic_of_fields(cls: type) -> dict[str, str]:
    """Field name -> the `# --- <topic>` comment block it is declared under in its class's source."""
    import inspect

    topics: dict[str, str] = {}
    try:
        source = inspect.getsource(cls)
    except (OSError, TypeError):
        return topics
    topic = None
    for line in source.splitlines():
        header = re.match(r"\s*# --- ([^:(]+)", line)
        if header:
            topic = header.group(1).strip()
            continue
        declared = re.match(r"\s{4}(\w+)\s*:\s*[^=]+=\s*field\(", line)
        if declared and topic:
            topics.setdefault(declared.group(1), topic)
    return topics


def _default_text(f: dataclasses.Field) -> str:
    if f.default is not _MISSING:
        value = f.default
    elif f.default_factory is not _MISSING:
        value = f.default_factory()
    else:
        return "required"
    if isinstance(value, enum.Enum):
        value = value.value
    return repr(value) if isinstance(value, str) else str(value)


def fields_help(cls: type, inherited_from: type | None = None, inherited_title: str = "inherited") -> str:
    """Every init field as ``--name (default: ...)`` + its help, grouped by the `# --- <topic>` it is declared
    under; fields `cls` inherits from `inherited_from` (and does not redeclare) go under `inherited_title`."""
    topics = topic_of_fields(cls)
    inherited = {f.name for f in dataclasses.fields(inherited_from)} if inherited_from is not None else set()
    groups: dict[str, list[str]] = {}
    for f in init_fields(cls).values():
        group = topics.get(f.name) or (inherited_title if f.name in inherited else "options")
        text = " ".join(str(f.metadata.get("help", "")).split())
        groups.setdefault(group, []).append(f"  --{f.name} (default: {_default_text(f)})\n      {text}".rstrip())
    source_order = list(dict.fromkeys(topics.values()))
    order = sorted(groups, key=lambda name: (name == inherited_title, (source_order + [name]).index(name)))
    return "\n\n".join(f"{name}:\n" + "\n".join(groups[name]) for name in order)
