import dataclasses

import pytest

from core.config import ConfigError, apply_overrides, from_dict, to_dict
from core.registry import Registry, UnknownNameError
from distill.recipes import RECIPES, V3, get_recipe, resolve_for_device


def test_overrides_are_typed_and_nested():
    r = apply_overrides(get_recipe("v3"), ["train.epochs=3", "train.lr_decoder=5e-4", "model.tasks=depth",
                                           "data.augment=false", "data.height=none"])
    assert (r.train.epochs, r.train.lr_decoder, r.model.tasks, r.data.augment, r.data.height) == (3, 5e-4, ("depth",), False, None)
    assert isinstance(r, V3) and get_recipe("v3").train.epochs is None  # frozen: the original is untouched


@pytest.mark.parametrize("override, message", [
    ("train.epoch=3", 'unknown key "train.epoch". Did you mean "train.epochs"? List every key with python -m '
                      'distill.run v3 --help.'),   # distill.evaluate's --help lists none
    ("trian.epochs=3", 'Did you mean "train.epochs"?'),
    ("amp=bf16", 'Did you mean "train.amp"?'),
    ("train.lr=1e-3", 'unknown key "train.lr". Did you mean "train.lr_encoder" or "train.lr_decoder"?'),
    ("train.epochs=three", "train.epochs='three': expected int"),
    ("train.amp=bf17", "must be one of 'auto', 'bf16', 'off'. Did you mean \"bf16\"?"),
    ("data.augment=maybe", "expected a boolean"),
    ("loss.berhu_residual=metres", "must be one of 'absolute', 'relative', 'log'"),
    ("model.fine_convs=full", "must be one of 'separable', 'pointwise'"),
    ("data=3", '"data" is a section; set one of its keys'),
    ("epochs", "is not key=value"),
    ("train.lr_encoder=nan", "train.lr_encoder='nan': expected a finite number"),
    ("loss.aux_weight=inf", "loss.aux_weight='inf': expected a finite number"),
    ("data.seed=1" + "0" * 400, "data.seed='1" + "0" * 400 + "': expected int"),
])
def test_override_errors_name_the_key_and_suggest(override, message):
    with pytest.raises(ConfigError, match=None) as err:
        apply_overrides(get_recipe("v3"), [override])
    assert message in str(err.value)


def test_json_round_trip_of_every_recipe():
    for name in RECIPES:
        recipe = get_recipe(name)
        assert from_dict(type(recipe), to_dict(recipe)) == recipe


def test_a_saved_config_with_nan_is_refused_as_an_override_would_be():
    """json.loads reads NaN: a hand-edited config.json must not pass what the command line refuses."""
    data = to_dict(get_recipe("v3"))
    data["train"]["lr_encoder"] = float("nan")
    with pytest.raises(ConfigError, match=r"train.lr_encoder=nan: expected <class 'float'> \(finite\)"):
        from_dict(type(get_recipe("v3")), data)


def test_recipe_history():
    v1, v3, v4 = get_recipe("v1"), get_recipe("v3"), get_recipe("v4")
    assert (v1.teacher.name, v1.loss.depth, v1.model.tasks, v1.model.student) == (
        "synthetic-relative", "mse", ("depth",), "mobilenetv3_small_100")
    assert (v3.teacher.name, v3.loss.depth, v3.loss.berhu_threshold, v3.loss.weighting) == (
        "synthetic-metric", "berhu", "p80", "kendall")
    # v4 = v3 with EfficientViT-B1, keeping the decoder and rates measured for it; v3's loss, deep
    # supervision included (history.py)
    v3_as_v4 = dataclasses.replace(v3, name="v4", model=dataclasses.replace(v3.model, student="efficientvit_b1", output_stride=4),
                                   train=dataclasses.replace(v3.train, lr_encoder=4e-3, lr_decoder=8e-3),
                                   loss=dataclasses.replace(v3.loss, normal_weight=0.0))   # not measured on v4 yet
    assert v3.loss.aux_weight == v4.loss.aux_weight == 0.5 and v1.loss.aux_weight == 0.0
    assert v3.loss.normal_weight == 1.0   # the other recipes keep the configuration their figures were measured in
    assert v1.loss.normal_weight == v4.loss.normal_weight == get_recipe("v5").loss.normal_weight == 0.0
    assert get_recipe("v6").loss.normal_weight == 0.0
    # Muon since 2026-12-06, measured on each; the historical v1 and v2 keep the AdamW they were measured with
    assert {get_recipe(n).train.optimizer for n in ("v3", "v4", "v5", "v6")} == {"muon"}
    assert {get_recipe(n).train.optimizer for n in ("v1", "v2")} == {"adamw"}
    assert to_dict(v4) == to_dict(v3_as_v4)
    assert "75.37 m" in type(v1).__doc__
    # v6 = v3 with fixed task weights that favour segmentation, without the normal head its figures predate
    v6 = get_recipe("v6")
    assert to_dict(v6) == to_dict(dataclasses.replace(v3, name="v6", loss=dataclasses.replace(
        v3.loss, weighting="fixed", depth_weight=2.0, seg_weight=1.2, normal_weight=0.0)))


def test_device_defaults_fill_only_unset_fields():
    recipe = apply_overrides(get_recipe("v3"), ["train.epochs=2"])
    resolved, filled = resolve_for_device(recipe, "cpu")
    assert resolved.train.epochs == 2 and "train.epochs" not in filled
    assert resolved.data.height % 32 == 0 and resolved.data.width % 32 == 0 and "data.height" in filled


@pytest.mark.parametrize("dataset, val_dataset, sized", [
    ("synthrooms", "", {"data.num_train", "data.num_val"}),
    ("nyu:/data/nyu", "", set()),                                  # all 654 test images, not the first 200
    ("folder:/data/frames", "synthrooms", {"data.num_val"}),       # SynthRooms renders the validation split
    ("synthrooms", "nyu:/data/nyu", {"data.num_train"}),
])
def test_device_sizes_only_the_splits_synthrooms_renders(dataset, val_dataset, sized):
    recipe = apply_overrides(get_recipe("v3"), [f"data.dataset={dataset}", f"data.val_dataset={val_dataset}"])
    resolved, filled = resolve_for_device(recipe, "cuda")
    assert {k for k in filled if k.startswith("data.num")} == sized
    assert (resolved.data.num_val is None) == ("data.num_val" not in sized)


def test_help_shows_what_each_device_gives_a_size_left_to_it():
    from distill.run import describe_keys
    lines = {line.split()[0]: line for line in describe_keys(get_recipe("v4")).splitlines()}
    assert "None: cpu 9, cuda 30" in lines["train.epochs"]    # v4 resizes itself for CPUs
    assert "None: cpu 128, cuda 256" in lines["data.height"]
    assert "None" not in lines["train.lr_encoder"]            # a value set in the recipe shows as it is


def test_a_recipes_help_shows_its_docstring_dedented_with_its_commands_as_written(capsys):
    """The docstring's body kept its source indentation, and its shell continuations joined each
    command into one line with a run of spaces."""
    from distill.run import main
    assert main(["v3", "--help"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("v3 - ") and lines[2] == "Three changes from v1, each necessary:"
    command = next(i for i, line in enumerate(lines) if "distill.cache_teacher da3-metric" in line)
    assert lines[command].endswith(" \\") and lines[command + 1].strip().startswith("data=nyu:")


def test_registry_duplicates_and_suggestions():
    reg = Registry("widget")
    reg.register("alpha", 1)
    with pytest.raises(ValueError, match='widget "alpha" is already registered'):
        reg.register("alpha", 2)
    with pytest.raises(UnknownNameError) as err:
        reg.get("alpah")
    assert str(err.value) == 'Unknown widget "alpah". Valid: alpha. Did you mean "alpha"?'


def test_a_run_saved_before_a_default_changed_keeps_the_value_it_trained_with(tmp_path):
    from core import io
    from core.config import to_dict
    from distill.recipes import load_saved

    saved = to_dict(get_recipe("v3"))
    del saved["loss"]["seg_balance"], saved["train"]["channels_last"], saved["loss"]["berhu_residual"]
    del saved["loss"]["aux_weight"], saved["loss"]["normal_weight"]   # its checkpoints have no training-only heads
    del saved["train"]["optimizer"]   # its optimizer state is AdamW's: a resume must build AdamW
    del saved["train"]["muon_rms"]    # the size of Muon's step it trained with
    del saved["train"]["shuffle_stride"]   # its batch orders: a resume must continue them
    io.write_json(tmp_path / "config.json", {**saved, "device": "cpu"})
    recipe = load_saved(tmp_path)
    assert recipe.loss.seg_balance == 0.0 and recipe.train.channels_last is False   # not today's defaults
    assert recipe.loss.aux_weight == 0.0 and get_recipe("v3").loss.aux_weight == 0.5
    assert recipe.loss.normal_weight == 0.0 and get_recipe("v3").loss.normal_weight == 1.0
    assert recipe.train.optimizer == "adamw" and get_recipe("v3").train.optimizer == "muon"
    assert recipe.train.muon_rms == 0.2 and get_recipe("v3").train.muon_rms == 0.8
    assert recipe.train.shuffle_stride == 1 and get_recipe("v3").train.shuffle_stride == 1_000_003
    assert recipe.loss.berhu_residual == "absolute" and get_recipe("v3").loss.berhu_residual == "log"
    assert get_recipe("v3").loss.seg_balance == 0.5


def test_out_dir_and_resume_take_the_home_folder_from_python_too(tmp_path, monkeypatch):
    """A shell expands `out_dir=~/x` on the command line; from Python (or quoted) the "~" was a
    folder named "~" in the working directory."""
    from distill.run import resolve

    monkeypatch.setenv("HOME", str(tmp_path))
    assert resolve("v3", ["out_dir=~/runs"]).out_dir == str(tmp_path / "runs")
    assert resolve(dataclasses.replace(get_recipe("v3"), out_dir="~/r"), []).out_dir == str(tmp_path / "r")
    with pytest.raises(ConfigError, match=f"resume={tmp_path}/gone: it does not exist"):
        resolve("v3", ["resume=~/gone"])
    # a run saved before that recorded "~/runs"; out_dir=~/runs names the same folder on resume
    from core import io
    from core.config import to_dict

    (tmp_path / "old").mkdir()
    io.write_json(tmp_path / "old" / "config.json", {**to_dict(get_recipe("v3")), "out_dir": "~/runs"})
    resumed = resolve("v3", ["resume=~/old", "out_dir=~/runs"])
    assert resumed.resume == str(tmp_path / "old") and resumed.out_dir == str(tmp_path / "runs")
    with pytest.raises(ConfigError, match="these overrides differ from it: out_dir="):
        resolve("v3", ["resume=~/old", "out_dir=~/elsewhere"])
