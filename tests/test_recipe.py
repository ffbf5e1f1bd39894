from pathlib import Path

import pytest

from transferkit.errors import RecipeError
from transferkit.recipe import Recipe, available_recipes, collect_overrides, load_recipe, parse_override

RECIPES = Path(__file__).resolve().parent.parent / "recipes"


def write(tmp_path, text):
    path = tmp_path / "r.toml"
    path.write_text(text)
    return path


def test_defaults_follow_the_two_stage_rule():
    recipe = load_recipe()
    assert recipe.stages[0].unfreeze == 0
    assert recipe.stages[1].unfreeze == 1
    ratio = recipe.stages[0].learning_rate / recipe.stages[1].learning_rate
    assert 10 <= ratio <= 100


@pytest.mark.parametrize("path", sorted(RECIPES.glob("*.toml")), ids=lambda p: p.stem)
def test_every_shipped_recipe_loads_and_is_commented(path):
    recipe = load_recipe(path)
    assert isinstance(recipe, Recipe)
    assert path.read_text().lstrip().startswith("#")


def test_shipped_recipes_include_the_documented_set():
    assert {"quickstart", "vgg16", "vgg19", "resnet50", "small-data"} <= set(available_recipes())


def test_quickstart_is_the_defaults_written_out():
    assert load_recipe("quickstart") == load_recipe()


def test_recipe_by_shipped_name():
    assert load_recipe("resnet50").backbone == "resnet50"


def test_file_then_overrides_take_precedence(tmp_path):
    path = write(tmp_path, 'backbone = "vgg19"\nimage_size = 64\n[head]\ndropout = 0.1\n')
    recipe = load_recipe(path, {"image_size": 48, "head.dropout": None})
    assert recipe.backbone == "vgg19"
    assert recipe.image_size == 48
    assert recipe.head.dropout == 0.1


def test_stage_overrides_by_index_and_open_range():
    recipe = load_recipe("vgg16", {"stages.0.epochs": 2, "stages.1:.epochs": 0})
    assert [stage.epochs for stage in recipe.stages] == [2, 0, 0]


@pytest.mark.parametrize("key", ["stages.5.epochs", "stages.2:.epochs", "stages.-3:.epochs"])
def test_stage_override_out_of_range_names_the_count(key):
    # an open range too: one past the last stage set nothing, one before the first raised IndexError
    with pytest.raises(RecipeError, match="the recipe has 2 stage"):
        load_recipe(None, {key: 1})


def test_a_negative_open_range_counts_from_the_last_stage_as_a_slice_does():
    recipe = load_recipe("vgg16", {"stages.0:.epochs": 4, "stages.-1:.epochs": 1})
    assert [stage.epochs for stage in recipe.stages] == [4, 4, 1]


def test_unknown_key_names_key_and_valid_keys(tmp_path):
    path = write(tmp_path, "[head]\ndropuot = 0.2\n")
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    message = str(info.value)
    assert "head.dropuot" in message and "dropout" in message and str(path) in message


def test_unknown_top_level_key(tmp_path):
    with pytest.raises(RecipeError, match="unknown key 'learning_rate'"):
        load_recipe(write(tmp_path, "learning_rate = 0.1\n"))


def test_wrong_type_names_key_and_value(tmp_path):
    with pytest.raises(RecipeError, match=r"batch_size = '32'"):
        load_recipe(write(tmp_path, 'batch_size = "32"\n'))


@pytest.mark.parametrize(
    "overrides, fragment",
    [
        ({"batch_size": 0}, "batch_size = 0"),
        ({"head.dropout": 1.5}, "head.dropout = 1.5"),
        ({"data.val_split": 0.0}, "data.val_split = 0.0"),
        ({"stages.0.learning_rate": -1.0}, "stages.0.learning_rate = -1.0"),
        ({"stages.0.epochs": -2}, "stages.0.epochs = -2"),
        ({"augment.rotation": -5.0}, "augment.rotation = -5.0"),
        ({"head.units": [0]}, "units[0] must be at least 1"),
    ],
)
def test_out_of_range_values_are_rejected(overrides, fragment):
    with pytest.raises(RecipeError, match=fragment.replace("[", r"\[").replace("]", r"\]")):
        load_recipe(None, overrides)


def test_unknown_optimizer_lists_choices():
    with pytest.raises(RecipeError) as info:
        load_recipe(None, {"stages.0.optimizer": "adagrad"})
    assert "adagrad" in str(info.value) and "'adam'" in str(info.value) and "'sgd'" in str(info.value)


def test_unknown_backbone_lists_choices():
    with pytest.raises(RecipeError, match="resnet50, tinyresnet, tinyvgg, vgg16, vgg19"):
        load_recipe(None, {"backbone": "vgg17"})


def test_image_size_below_backbone_minimum():
    with pytest.raises(RecipeError, match="below the vgg16 minimum of 32"):
        load_recipe(None, {"image_size": 16})


def test_a_mapping_given_as_the_recipe_is_told_to_go_in_overrides():
    with pytest.raises(RecipeError, match=r"^recipe must be a shipped recipe's name, a TOML file's path or a Recipe; "
                                          r"got dict; a mapping of keys to values goes in overrides="):
        load_recipe({"image_size": 64})
    with pytest.raises(RecipeError, match=r"or a Recipe; got int$"):
        load_recipe(3)


def test_image_size_above_the_largest_is_refused_before_any_image_is_decoded():
    from transferkit.recipe import MAX_IMAGE_SIZE

    assert load_recipe(None, {"image_size": MAX_IMAGE_SIZE}).image_size == 4096
    with pytest.raises(RecipeError, match=r"image_size: 100000 is above the largest size transferkit trains at, 4096 "
                                          r".*use 4096 or less"):
        load_recipe(None, {"image_size": 100_000})


def test_unfreeze_beyond_blocks_names_the_limit():
    with pytest.raises(RecipeError, match="5 blocks of vgg16"):
        load_recipe(None, {"stages.1.unfreeze": 6})
    assert load_recipe(None, {"backbone": "resnet50", "stages.1.unfreeze": 6}).stages[1].unfreeze == 6


def test_unfreeze_accepts_all_and_rejects_other_words():
    assert load_recipe(None, {"stages.1.unfreeze": "all"}).stages[1].unfreeze == "all"
    with pytest.raises(RecipeError, match="integer >= 0 or 'all'"):
        load_recipe(None, {"stages.1.unfreeze": "most"})


def test_weights_must_be_a_choice_or_an_existing_file(tmp_path, monkeypatch):
    with pytest.raises(RecipeError, match="weights"):
        load_recipe(None, {"weights": str(tmp_path / "missing.h5")})
    existing = tmp_path / "w.weights.h5"
    existing.write_bytes(b"x")
    assert load_recipe(None, {"weights": str(existing)}).weights == str(existing)
    # A relative path is kept absolute: the recipe.toml a run writes names the same file
    # from any folder (--resume, or --recipe, run elsewhere).
    monkeypatch.chdir(tmp_path)
    recipe = load_recipe(None, {"weights": "w.weights.h5"})
    assert recipe.weights == str(existing)
    monkeypatch.chdir(tmp_path.parent)
    assert load_recipe(None, {"weights": recipe.weights}).weights == str(existing)


def test_invalid_toml_is_reported_with_the_file(tmp_path):
    path = write(tmp_path, "image_size = = 3\n")
    with pytest.raises(RecipeError, match="not valid TOML"):
        load_recipe(path)


def test_missing_recipe_lists_shipped_names():
    with pytest.raises(RecipeError, match="quickstart"):
        load_recipe("no-such-recipe")


def test_resolved_recipe_round_trips_through_toml(tmp_path):
    recipe = load_recipe("resnet50", {"seed": 7, "stages.1.unfreeze": "all"})
    path = write(tmp_path, recipe.to_toml())
    assert load_recipe(path) == recipe


def test_recipe_is_frozen():
    recipe = load_recipe()
    from pydantic import ValidationError

    with pytest.raises(ValidationError):
        recipe.image_size = 64


def test_parse_override_reads_toml_values():
    assert parse_override("head.units=[64, 32]") == ("head.units", [64, 32])
    assert parse_override("augment.hflip=false") == ("augment.hflip", False)
    assert parse_override("backbone=resnet50") == ("backbone", "resnet50")
    with pytest.raises(RecipeError, match="KEY=VALUE"):
        parse_override("dropout")


@pytest.mark.parametrize("key", ["stages.patience", "stages:.patience"])
def test_a_stage_key_without_a_stage_says_how_to_name_one(key):
    with pytest.raises(RecipeError, match=r"stages\.0\.patience \(the first\), stages\.1:\.patience"):
        load_recipe(None, {key: 100})


def test_messages_speak_of_lists_and_of_where_the_value_came_from(tmp_path):
    expected = r"^head\.units = 512: expected a list, e\.g\. \[512\] \(in the built-in recipe with your settings\)$"
    with pytest.raises(RecipeError, match=expected):
        load_recipe(None, {"head.units": 512})
    # no example that would be refused in its turn
    with pytest.raises(RecipeError, match=r"^head\.units = -5: expected a list \(in the built-in"):
        load_recipe(None, {"head.units": -5})
    with pytest.raises(RecipeError, match=r"= '\[256': expected a list \(TOML writes one in brackets, both of them"):
        load_recipe(None, collect_overrides(["head.units=[256"], {}))
    empty = tmp_path / "empty.toml"
    empty.write_text("stages = []\n")
    with pytest.raises(RecipeError, match="has no stages; at least one"):
        load_recipe(empty, {"stages.0.epochs": 1})


def test_new_knobs_default_to_todays_behaviour():
    recipe = load_recipe()
    assert recipe.head.activation == "relu"
    assert recipe.loss.label_smoothing == 0.0
    for stage in recipe.stages:
        assert (stage.schedule, stage.warmup_epochs, stage.weight_decay) == ("constant", 0.0, 0.0)


@pytest.mark.parametrize(
    "key, value, fragments",
    [
        ("head.activation", "tanh", ["head.activation = 'tanh'", "'leaky_relu'", "'selu'"]),
        ("stages.0.schedule", "step", ["stages.0.schedule = 'step'", "'cosine'", "'one-cycle'"]),
        ("stages.1.warmup_epochs", -1.0, ["stages.1.warmup_epochs = -1.0", "greater than or equal to 0"]),
        ("stages.0.weight_decay", 1.5, ["stages.0.weight_decay = 1.5", "less than 1"]),
        ("loss.label_smoothing", 1.0, ["loss.label_smoothing = 1.0", "less than 1"]),
        ("loss.smoothing", 0.1, ["unknown key 'loss.smoothing'", "label_smoothing"]),
    ],
)
def test_new_keys_are_validated_in_one_line(key, value, fragments):
    with pytest.raises(RecipeError) as info:
        load_recipe(None, {key: value})
    message = str(info.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message


@pytest.mark.parametrize("path", sorted(RECIPES.glob("*.toml")), ids=lambda p: p.stem)
def test_every_shipped_recipe_writes_out_each_new_key_with_a_comment(path):
    text = path.read_text()
    for key in ("activation", "label_smoothing", "schedule", "warmup_epochs", "weight_decay"):
        lines = [line for line in text.splitlines() if line.startswith(f"{key} =")]
        assert lines, f"{path.name} lacks {key}"
        assert any("#" in line for line in lines), f"{path.name}: {key} is not commented"
    recipe = load_recipe(path)
    assert all(stage.schedule == "constant" for stage in recipe.stages)


def test_overrides_go_over_a_recipe_object_too_and_must_be_a_mapping():
    base = load_recipe("quickstart", {"image_size": 48})
    assert load_recipe(base) is base and load_recipe(base, {"image_size": None}) is base
    changed = load_recipe(base, {"weights": "none", "stages.1:.epochs": 0})
    assert (changed.weights, changed.image_size, [stage.epochs for stage in changed.stages][1:]) == (
        "none", 48, [0] * (len(base.stages) - 1))
    assert changed.head == base.head and base.weights == "imagenet"
    with pytest.raises(RecipeError, match=r"image_size.*\(in the given recipe with your settings\)"):
        load_recipe(base, {"image_size": "big"})
    with pytest.raises(RecipeError, match="overrides must map dotted recipe keys to values.*got a list"):
        load_recipe(None, ["weights=none"])


def test_a_flag_and_a_set_of_its_key_that_disagree_are_refused():
    assert collect_overrides(["batch_size=8", "seed=3"], {"batch_size": 8, "image_size": None}) == {
        "batch_size": 8, "seed": 3}
    with pytest.raises(RecipeError, match=r"--set batch_size=0 and --batch-size 8 both set batch_size; give one"):
        collect_overrides(["batch_size=0"], {"batch_size": 8})
    # --fine-epochs sets every stage from the second: a --set of one of those stages meets it.
    with pytest.raises(RecipeError, match=r"--set stages.1.epochs=3 and --fine-epochs 2 both set stages.1.epochs"):
        collect_overrides(["stages.1.epochs=3"], {"fine_epochs": 2})
    with pytest.raises(RecipeError, match=r"--set stages.0:.epochs=3 and --head-epochs 2"):
        collect_overrides(["stages.0:.epochs=3"], {"head_epochs": 2})
    assert collect_overrides(["stages.0.epochs=3", "stages.1.learning_rate=1e-5"], {"fine_epochs": 2}) == {
        "stages.0.epochs": 3, "stages.1.learning_rate": 1e-5, "stages.1:.epochs": 2}


def test_a_recipe_path_that_is_a_folder_is_named_as_such(tmp_path):
    (tmp_path / "dir.toml").mkdir()
    with pytest.raises(RecipeError, match="recipe .*dir.toml is a folder; pass a .toml file in it"):
        load_recipe(tmp_path / "dir.toml")


def test_two_stages_named_alike_are_refused(tmp_path):
    path = tmp_path / "twice.toml"
    path.write_text('[[stages]]\nname = "a"\nepochs = 1\n[[stages]]\nname = "a"\nepochs = 1\nunfreeze = 1\n')
    with pytest.raises(RecipeError, match="two stages are named 'a' .*give each its own name"):
        load_recipe(path)
    path.write_text("[[stages]]\nepochs = 1\n[[stages]]\nepochs = 1\nunfreeze = 1\n")  # unnamed: taken as they are
    unnamed = load_recipe(path)
    assert [stage.name for stage in unnamed.stages] == ["stage", "stage"]
    path.write_text(unnamed.to_toml())  # as its run's recipe.toml names them
    assert load_recipe(path) == unnamed


@pytest.mark.parametrize("selector", [":1", "0:1", "a"])
def test_a_stage_selector_that_is_no_index_or_range_is_told_as_such(selector):
    with pytest.raises(RecipeError, match=rf"override stages.{selector}.epochs: a stage key names its stages: "
                                          r"stages.0.epochs \(the first\), stages.1:.epochs \(the second on\)"):
        load_recipe(None, {f"stages.{selector}.epochs": 1})
    with pytest.raises(RecipeError, match="the recipe has 2 stage"):  # a real index the recipe lacks
        load_recipe(None, {"stages.5.epochs": 1})


def test_horizontal_flip_is_auto_by_default_and_takes_true_false_or_auto(tmp_path):
    assert load_recipe().augment.hflip == "auto"
    assert all(load_recipe(name).augment.hflip == "auto" for name in available_recipes())
    assert load_recipe(None, dict([parse_override("augment.hflip=auto")])).augment.hflip == "auto"
    assert load_recipe(None, dict([parse_override("augment.hflip=false")])).augment.hflip is False
    assert load_recipe(write(tmp_path, "[augment]\nhflip = true\n")).augment.hflip is True
    for wrong in ("sometimes", 1, "true"):
        with pytest.raises(RecipeError) as info:
            load_recipe(None, {"augment.hflip": wrong})
        assert str(info.value).startswith(f"augment.hflip: choose true, false or \"auto\", not {wrong!r}")
