"""Every shipped recipe names only settings that its command knows (pretrain-*.json: `slm pretrain`,
the others `slm distill`)."""

import json
from pathlib import Path

import pytest

from smallmighty.cli import build_parser

RECIPES = sorted((Path(__file__).resolve().parents[1] / "recipes").glob("*.json"))


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.name)
def test_recipe_keys_are_settings_of_its_command(recipe):
    verb = "pretrain" if recipe.name.startswith("pretrain-") else "distill"
    args = build_parser().parse_args([verb])
    unknown = set(json.loads(recipe.read_text())) - set(vars(args))
    assert not unknown, f"{recipe.name}: unknown settings {unknown}"
