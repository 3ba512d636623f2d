import dataclasses
import tomllib
from pathlib import Path

import pytest

from fastrefine.recipe import RecipeError, load_recipe, parse_override, recipe_from_dict, recipe_to_dict, to_toml

ROOT = Path(__file__).resolve().parents[1]

BASE = """
[data]
path = "data/x"
[model]
name = "tiny_cnn"
[[rounds]]
name = "r0"
epochs = 2
[[rounds]]
name = "r1"
epochs = 3
"""


def write(tmp_path, text, name="r.toml"):
    p = tmp_path / name
    p.write_text(text)
    return p


def test_good_file_and_defaults(tmp_path):
    r = load_recipe(write(tmp_path, BASE))
    assert r.data.path == "data/x"
    assert r.loader.scale == (0.08, 1.0)
    assert [x.epochs for x in r.rounds] == [2, 3]
    # inheritance resolved at load: the rest of the code reads real values
    assert [x.refinery for x in r.rounds] == ["none", "r0"]
    assert [(x.model, x.model_options, x.lr) for x in r.rounds] == [("tiny_cnn", {}, 0.1)] * 2
    assert (r.loader.val_batch_size, r.loader.val_resolution) == (r.loader.batch_size, r.loader.resolution)
    p = load_recipe(write(tmp_path, BASE), ["optim.lr=0.3", "loader.progressive={start = 128, end = 192}",
                                            "rounds[1].refinery=previous", "rounds[1].model_options={width = 2}"])
    assert [x.lr for x in p.rounds] == [0.3, 0.3] and p.loader.val_resolution == 192
    assert p.rounds[1].refinery == "r0" and [x.model_options for x in p.rounds] == [{}, {"width": 2}]
    assert r.refinery.loss == "soft_ce" and r.refinery.bn == "eval"


def test_unknown_key_names_file_and_dotted_path(tmp_path):
    p = write(tmp_path, BASE.replace("[model]", "[model]\nnmae = 'x'"))
    with pytest.raises(RecipeError) as e:
        load_recipe(p)
    msg = str(e.value)
    assert str(p) in msg and "model.nmae: unknown key" in msg and "did you mean 'name'" in msg


def test_unknown_section(tmp_path):
    with pytest.raises(RecipeError, match=r"optimizer: unknown key"):
        load_recipe(write(tmp_path, BASE + "\n[optimizer]\nlr = 1\n"))


def test_wrong_type_and_range(tmp_path):
    with pytest.raises(RecipeError, match=r"optim\.lr: expected a number, got 'fast'"):
        load_recipe(write(tmp_path, BASE + "\n[optim]\nlr = 'fast'\n"))
    with pytest.raises(RecipeError, match=r"optim\.lr: expected a value > 0"):
        load_recipe(write(tmp_path, BASE + "\n[optim]\nlr = 0\n"))
    with pytest.raises(RecipeError, match=r"rounds\[0\]\.epochs: expected an integer"):
        load_recipe(write(tmp_path, BASE.replace("epochs = 2", "epochs = 2.5")))
    with pytest.raises(RecipeError, match=r"loader\.scale: expected \[low, high\]"):
        load_recipe(write(tmp_path, BASE + "\n[loader]\nscale = [1.0, 0.5]\n"))


def test_bad_refinery_value_lists_choices(tmp_path):
    p = write(tmp_path, BASE.replace('epochs = 3', 'epochs = 3\nrefinery = "prev"'))
    with pytest.raises(RecipeError) as e:
        load_recipe(p)
    assert 'rounds[1].refinery: expected one of "none", "previous", an earlier round' in str(e.value)
    assert "got 'prev'" in str(e.value)


def test_first_round_cannot_use_previous(tmp_path):
    with pytest.raises(RecipeError, match=r"rounds\[0\]\.refinery"):
        load_recipe(write(tmp_path, BASE.replace('epochs = 2', 'epochs = 2\nrefinery = "previous"')))


def test_literal_choice_error(tmp_path):
    with pytest.raises(RecipeError, match=r"refinery\.bn: expected one of 'eval', 'batch', got 'train'"):
        load_recipe(write(tmp_path, BASE + '\n[refinery]\nbn = "train"\n'))


def test_overrides(tmp_path):
    p = write(tmp_path, BASE)
    r = load_recipe(p, ["optim.lr=0.4", "run.out=/tmp/x", "rounds[1].epochs=7", "loader.scale=[0.35, 1]"])
    assert r.optim.lr == 0.4 and r.run.out == "/tmp/x" and r.rounds[1].epochs == 7
    assert r.loader.scale == (0.35, 1.0)
    with pytest.raises(RecipeError, match=r"optim\.lrr: unknown key"):
        load_recipe(p, ["optim.lrr=0.4"])
    with pytest.raises(RecipeError, match="expected KEY=VALUE"):
        load_recipe(p, ["optim.lr"])
    with pytest.raises(RecipeError, match=r"rounds\[5\] does not exist"):
        load_recipe(p, ["rounds[5].epochs=1"])
    assert parse_override("run.name=my-run") == (["run", "name"], "my-run")


def test_resolved_recipe_round_trips(tmp_path):
    r = load_recipe(write(tmp_path, BASE), ["model.options={width = 8}"])
    text = to_toml(recipe_to_dict(r))
    again = recipe_from_dict(tomllib.loads(text))
    assert again == dataclasses.replace(r, source="<dict>")
    assert [x.model_options for x in again.rounds] == [{"width": 8}] * 2
    assert "model" not in recipe_to_dict(r)  # each round names its model: no [model] section to read


@pytest.mark.parametrize("path", sorted((ROOT / "recipes").glob("*.toml")), ids=lambda p: p.name)
def test_shipped_recipes_load(path):
    r = load_recipe(path)
    # what the rounds and the loader inherit is resolved: real values of the types the code reads
    for rd in r.rounds:
        assert isinstance(rd.model, str) and rd.model and isinstance(rd.model_options, dict)
        assert isinstance(rd.lr, float) and isinstance(rd.refinery, str) and rd.refinery != "previous"
    assert isinstance(r.loader.val_batch_size, int) and isinstance(r.loader.val_resolution, int)
    # the resolved recipe written into a run folder loads back to the same recipe
    assert recipe_from_dict(tomllib.loads(to_toml(recipe_to_dict(r)))) == dataclasses.replace(r, source="<dict>")
    assert path.read_text().lstrip().startswith("#")  # a header says what the recipe is and what it reached


def test_inherit_means_left_out_and_zero_means_zero(tmp_path):
    from fastrefine.recipe import round_seed
    from fastrefine.schedule import round_schedule

    def round_lr(r, i, *, world_size):
        return round_schedule(r, i, world_size=world_size).peak
    text = BASE + '\n[[rounds]]\nname = "b"\nepochs = 1\nlr = 0.0\nseed_from = "' + "{first}" + '"\n'
    r0 = load_recipe(write(tmp_path, BASE))
    first = r0.rounds[0].name
    r = load_recipe(write(tmp_path, text.replace("{first}", first)))
    assert r.rounds[0].lr == r.optim.lr and round_lr(r, 0, world_size=1) > 0   # left out: [optim].lr
    assert round_lr(r, len(r.rounds) - 1, world_size=1) == 0.0            # lr = 0 means zero
    assert round_seed(r, len(r.rounds) - 1) == round_seed(r, 0)          # seed_from: the same seed
    two = round_lr(r, 0, world_size=2)
    assert two == pytest.approx(2 * round_lr(r, 0, world_size=1))       # linear in the global batch
    with pytest.raises(RecipeError, match="moved to each round"):
        load_recipe(write(tmp_path, BASE), ["optim.label_smoothing=0.1"])


def test_resolved_types_say_what_the_code_reads():
    """The inherited fields of a loaded recipe are typed without None; the schema's may be left out."""
    import typing

    from fastrefine.recipe import LoaderConfig, LoaderSpec, RoundConfig, RoundSpec
    for resolved, spec, keys in ((RoundConfig, RoundSpec, ("model", "model_options", "lr", "refinery")),
                                 (LoaderConfig, LoaderSpec, ("val_batch_size", "val_resolution"))):
        hints, schema = typing.get_type_hints(resolved), typing.get_type_hints(spec)
        for key in keys:
            assert type(None) not in typing.get_args(hints[key]), (resolved.__name__, key)
            assert type(None) in typing.get_args(schema[key]), (spec.__name__, key)


def test_data_path_is_required_and_named(tmp_path):
    no_path = BASE.replace('[data]\npath = "data/x"\n', "")
    for text in (no_path, no_path + "\n[data]\nnum_classes = 3\n"):
        with pytest.raises(RecipeError, match=r"data\.path: missing \(required\): converted dataset folder"):
            load_recipe(write(tmp_path, text))
    with pytest.raises(RecipeError, match=r"data\.path: expected a converted dataset folder .*got ''"):
        load_recipe(write(tmp_path, BASE), ["data.path=''"])


def test_grad_clip_is_left_out_for_none_and_zero_is_an_error(tmp_path):
    r = load_recipe(write(tmp_path, BASE))
    assert r.optim.grad_clip is None and "grad_clip" not in recipe_to_dict(r)["optim"]
    assert load_recipe(write(tmp_path, BASE), ["optim.grad_clip=1.5"]).optim.grad_clip == 1.5
    for bad in ("0", "0.0", "-1"):
        with pytest.raises(RecipeError, match=r"optim\.grad_clip: expected a value > 0\.0, got .*leave the key "
                                              r"out for no clipping"):
            load_recipe(write(tmp_path, BASE), [f"optim.grad_clip={bad}"])


def test_no_empty_string_stands_for_unset(tmp_path):
    r = load_recipe(write(tmp_path, BASE))
    assert r.refinery.class_map is None and "class_map" not in recipe_to_dict(r)["refinery"]
    with pytest.raises(RecipeError, match=r"refinery\.class_map: expected a JSON file, got ''"):
        load_recipe(write(tmp_path, BASE), ["refinery.class_map=''"])
    with pytest.raises(RecipeError, match=r"model\.name: expected a model name, got ''"):
        load_recipe(write(tmp_path, BASE.replace('name = "tiny_cnn"', 'name = ""')))
    # each round names its model: no [model] needed
    own = BASE.replace('[model]\nname = "tiny_cnn"\n', "").replace("epochs = 2", 'epochs = 2\nmodel = "tiny_cnn"')
    own = own.replace("epochs = 3", 'epochs = 3\nmodel = "tiny_cnn"')
    assert [x.model for x in load_recipe(write(tmp_path, own)).rounds] == ["tiny_cnn"] * 2
    with pytest.raises(RecipeError, match=r"rounds\[1\]\.model: no model"):
        load_recipe(write(tmp_path, own.replace('epochs = 3\nmodel = "tiny_cnn"', "epochs = 3")))


def test_a_record_from_before_reads_its_unset_keys_as_left_out(tmp_path):
    """A run folder's recipe.toml written when 0 and "" stood for unset still loads as a record."""
    old = BASE.replace('name = "tiny_cnn"', 'name = "tiny_cnn"\noptions = {}') + (
        '\n[optim]\ngrad_clip = 0.0\n[refinery]\nclass_map = ""\n')
    p = write(tmp_path, old, "recipe.toml")
    with pytest.raises(RecipeError, match=r"optim\.grad_clip"):
        load_recipe(p)
    r = load_recipe(p, recorded=True)
    assert r.optim.grad_clip is None and r.refinery.class_map is None
    assert r == dataclasses.replace(load_recipe(write(tmp_path, BASE)), source=str(p))
