"""The house: pure modules stay pure, the package root imports lazily, the public API keeps its names."""

import subprocess
import sys

import pytest

import hf_fcmoe

HEAVY = ("transformers", "peft", "huggingface_hub", "trl", "accelerate", "datasets")


def _loaded_after(statement: str) -> list[str]:
    code = f"import sys; {statement}; print(','.join(m for m in {HEAVY!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    return [name for name in out.split(",") if name]


@pytest.mark.parametrize(
    "statement",
    [
        "import hf_fcmoe",
        "import hf_fcmoe.aggregation",
        "from hf_fcmoe.aggregation import AggregationHub",
        "import hf_fcmoe.adapters.layout",
        "from hf_fcmoe import ExpertLayout, AggregationHub",
        "import hf_fcmoe.cli",
        "import hf_fcmoe.metrics.routing",
    ],
)
def test_pure_imports_load_no_hugging_face_library(statement):
    assert _loaded_after(statement) == []


def test_public_api_resolves_every_exported_name():
    for name in hf_fcmoe.__all__:
        assert getattr(hf_fcmoe, name) is not None, name
    assert set(hf_fcmoe.__all__) <= set(dir(hf_fcmoe))
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        hf_fcmoe.nope  # noqa: B018


def test_cli_help_answers_without_heavy_imports():
    code = (
        "import sys, contextlib, io\n"
        "from hf_fcmoe.cli import main\n"
        "with contextlib.suppress(SystemExit), contextlib.redirect_stdout(io.StringIO()):\n"
        "    main(['--help'])\n"
        f"print(','.join(m for m in {HEAVY!r} + ('torch',) if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == ""
