"""Card templates live in model_cards/ at the top level and ship in the wheel (hf_fcmoe/model_cards links there)."""

from pathlib import Path

from hf_fcmoe.hub.cards import TEMPLATES, template_path

REPO_ROOT = Path(__file__).resolve().parents[1]


def test_templates_resolve_through_the_package_to_the_top_level_folder():
    for name in TEMPLATES.values():
        path = Path(template_path(next(k for k, v in TEMPLATES.items() if v == name)))
        assert path.is_file() and path.resolve() == (REPO_ROOT / "model_cards" / name).resolve()
    pyproject = (REPO_ROOT / "pyproject.toml").read_text()
    assert '"model_cards/*.md"' in pyproject  # package-data: what puts them in the wheel
