"""Recipe schema: shipped recipes validate, overrides and flags merge, errors name the key."""

from __future__ import annotations

import random

import pytest
import yaml

from minillm_cli.config.loading import (
    dump_resolved,
    is_pipeline,
    load_recipe,
    parse_override,
    read_recipe_file,
    shipped_recipes,
)
from minillm_cli.config.schema import Recipe
from minillm_cli.config.validation import validate
from minillm_cli.errors import UserError


def test_every_shipped_recipe_validates():
    paths = shipped_recipes()
    # recursive glob: the cpu/ and paper/ folders are included, data files are not
    assert any("paper" in p.parts for p in paths) and any("cpu" in p.parts for p in paths)
    from minillm_cli.commands.quickstart import QuickstartRecipe, load_pipeline

    for path in paths:
        if is_pipeline(path):
            assert isinstance(load_pipeline(path), QuickstartRecipe), path
        else:
            recipe, _ = load_recipe(path)
            assert isinstance(recipe, Recipe), path


def test_defaults_need_no_file():
    recipe, source = load_recipe(None, [], {"models.teacher": "t", "models.student": "s"})
    assert recipe.method.name == "minillm"
    assert recipe.method.teacher_mix == 0.2 and recipe.method.gamma == 0.95
    assert source == {"models.teacher": "flag", "models.student": "flag"}


def test_length_normalisation_is_on_by_default_and_in_the_paper_recipes():
    # issue 31: off was the default for a while; a held-out check reverted it to the paper's setting
    recipe, _ = load_recipe(None, [], {"models.teacher": "t", "models.student": "s"})
    assert recipe.method.name == "minillm" and recipe.method.length_norm is True
    paper = [p for p in shipped_recipes() if "paper" in p.parts]
    assert len(paper) == 3
    for path in paper:
        method = load_recipe(path)[0].method
        assert method.name == "minillm" and method.length_norm is True, path


def test_overrides_beat_file_and_flags_beat_overrides(tmp_path):
    f = tmp_path / "r.yaml"
    f.write_text("optim: {lr: 1.0e-4}\ntrain: {max_steps: 7}\nmethod: kd\n")
    recipe, source = load_recipe(f, ["optim.lr=2e-5", "method.kd_ratio=0.25"], {"train.max_steps": 3})
    assert recipe.optim.lr == 2e-5
    assert recipe.train.max_steps == 3
    assert recipe.method.name == "kd" and recipe.method.kd_ratio == 0.25
    assert source["optim.lr"] == "override" and source["train.max_steps"] == "flag"
    text = dump_resolved(recipe, source)
    assert "lr: 2.0e-05  # override" in text and "max_steps: 3  # flag" in text
    assert yaml.safe_load(text)["optim"]["lr"] == 2e-5  # the dump is valid YAML


@pytest.mark.parametrize(
    "overrides, needle",
    [
        (["optim.lrr=1"], "optim.lrr: unknown key"),
        (["optim.lr=abc"], "optim.lr"),
        (["train.max_steps=0"], "train.max_steps"),
        (["method.name=foo"], "method.name"),
        (["eval.max_new_tokens=0"], "eval.max_new_tokens"),
        (["method.max_new_tokens=-1"], "method.max_new_tokens"),
        (["data.max_prompt_tokens=600"], "max_prompt_tokens"),
        (["models.student=a", "models.student_init={from: teacher, keep: 2}"], "models"),
        (["optim.betas=[0.9, 1.5]"], "optim.betas"),
        (["nonsense=1"], "nonsense: unknown key"),
        (["optim.lr"], "section.key=value"),
        (["optim.lr=[1"], "optim.lr"),
    ],
)
def test_errors_name_the_key(overrides, needle):
    with pytest.raises(UserError) as e:
        load_recipe(None, overrides)
    assert needle in str(e.value)
    assert "\n" not in str(e.value)


def test_bad_yaml_file_names_file_and_line(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("optim:\n  lr: [1\n")
    with pytest.raises(UserError, match=r"bad.yaml line \d+"):
        read_recipe_file(f)


def test_missing_recipe_file():
    with pytest.raises(UserError, match="recipe file not found"):
        read_recipe_file("does/not/exist.yaml")


def test_yaml_is_loaded_safely(tmp_path):
    f = tmp_path / "evil.yaml"
    f.write_text("optim: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(UserError):
        read_recipe_file(f)


def test_override_values_are_yaml_not_shell():
    assert parse_override("data.train=$(rm -rf /)") == ("data.train", "$(rm -rf /)")
    assert parse_override("optim.betas=[0.9, 0.99]") == ("optim.betas", [0.9, 0.99])


def _mutate(tree, rng):
    """Random recipe mutation: change a value's type, delete a key, add a key, or nest nonsense."""
    sections = list(tree)
    sec = rng.choice(sections)
    node = tree[sec]
    if not isinstance(node, dict) or not node:
        tree[sec] = rng.choice([None, 3, "x", [1], {"bogus": 1}])
        return
    key = rng.choice(list(node))
    choice = rng.randrange(6)
    if choice == 0:
        node[key] = rng.choice([None, -1, 0, 1e30, "text", [], {}, True, float("nan")])
    elif choice == 1:
        del node[key]
    elif choice == 2:
        node[key + "_typo"] = node[key]
    elif choice == 3:
        node[key] = {"nested": node[key]}
    elif choice == 4:
        tree[sec + "s"] = node
    else:
        node[key] = str(node[key])


def test_fuzz_recipe_mutations_give_valid_recipe_or_clean_error():

    base = [read_recipe_file(p) for p in shipped_recipes() if not is_pipeline(p)]
    rng = random.Random(1234)
    outcomes = {"ok": 0, "error": 0}
    for _ in range(400):
        tree = yaml.safe_load(yaml.safe_dump(rng.choice(base)))
        for _ in range(rng.randint(1, 3)):
            _mutate(tree, rng)
        try:
            validate(tree)
            outcomes["ok"] += 1
        except UserError as e:
            msg = str(e)
            assert msg.startswith("invalid recipe: ") and "\n" not in msg
            outcomes["error"] += 1
    assert outcomes["ok"] > 0 and outcomes["error"] > 0
