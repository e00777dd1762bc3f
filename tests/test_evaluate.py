"""`python -m distill.evaluate`: a finished run measured again, on its own split or on rooms it never saw."""
import json
from pathlib import Path
from typing import Iterator

import pytest

from core.io import IntegrityError
from distill.evaluate import main as evaluate_main
from distill.run import main as run_main

TINY = ["model.student=mobilenetv3_small_050", "model.decoder_channels=16", "data.height=64", "data.width=96",
        "data.num_train=16", "data.num_val=8", "train.batch_size=8", "train.epochs=1", "eval.preview_images=1"]


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Iterator[Path]:
    with pytest.MonkeyPatch.context() as env:   # the cache for the run and for every evaluation of it
        env.setenv("DENSEKIT_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))
        out = tmp_path_factory.mktemp("runs")
        assert run_main(["v3", *TINY, f"out_dir={out}", "--quiet"]) == 0
        (run_dir,) = [p for p in out.iterdir() if p.is_dir()]
        yield run_dir


def test_its_own_split_gives_the_figures_of_its_summary(run, capsys):
    """Only the validation split is rendered here (one training image): the same 8 images, the same student."""
    assert evaluate_main([str(run), "--quiet"]) == 0
    summary = json.loads((run / "summary.json").read_text())
    result = json.loads((run / "evaluations" / "validation.json").read_text())
    for key in ("abs_rel", "miou", "d1", "dbe_comp", "seg_boundary_f1", "teacher_abs_rel", "baseline_abs_rel",
                "gap_closed"):
        assert result[key] == pytest.approx(summary[key], rel=1e-6), key
    assert result["images"] == 8 and result["overrides"] == []
    assert result["weights_sha256"] == summary["best"]["sha256"]
    assert result["baseline_depth"] == summary["baseline_depth"] > 0
    assert "8 images (its own validation split)" in capsys.readouterr().out


def test_other_rooms_are_other_images_and_their_own_file(run):
    assert evaluate_main([str(run), "data.seed=1", "data.num_val=12", "--quiet"]) == 0
    summary = json.loads((run / "summary.json").read_text())
    result = json.loads((run / "evaluations" / "data.num_val=12_data.seed=1.json").read_text())
    assert result["images"] == 12 and result["data"]["seed"] == 1
    assert result["baseline_depth"] == summary["baseline_depth"]
    assert result["abs_rel"] != summary["abs_rel"] and result["baseline_abs_rel"] != summary["baseline_abs_rel"]


def test_the_python_api_returns_what_the_command_writes(run, tmp_path):
    from distill import evaluate_run

    assert evaluate_main([str(run), "eval.max_depth=5", "eval.teacher=false", "--out", str(tmp_path / "e.json"),
                          "--quiet"]) == 0
    written = json.loads((tmp_path / "e.json").read_text())
    result = evaluate_run(run, overrides=["eval.max_depth=5", "eval.teacher=false"], progress=False,
                          log=lambda *a: None)
    assert result["abs_rel"] == written["abs_rel"] and "teacher_abs_rel" not in result and "gap_closed" not in result


def test_replaced_weights_are_refused(run, tmp_path):
    import shutil

    copy = tmp_path / run.name
    shutil.copytree(run, copy)
    weights = (copy / "best.safetensors").read_bytes()
    (copy / "best.safetensors").write_bytes(weights[:-1] + bytes([weights[-1] ^ 1]))
    from distill import evaluate_run

    with pytest.raises(IntegrityError, match="differs from the sha256 its run recorded.*pick another run"):
        evaluate_run(copy, progress=False, log=lambda *a: None)
    (copy / "summary.json").unlink()   # unfinished: the record is its last checkpoint's, and resuming may mend it
    with pytest.raises(IntegrityError, match=f"did not finish: resume it \\(python -m distill.run v3 resume={copy}"):
        evaluate_run(copy, progress=False, log=lambda *a: None)


def test_a_run_without_best_weights_names_its_checkpoints_checked_digest(run, tmp_path, monkeypatch):
    """An unfinished run without kept weights is read from its last checkpoint, checked against its
    record; a finished one whose best.safetensors went missing is refused."""
    import shutil

    from core import io
    from distill.training import load_run

    copy = tmp_path / run.name
    shutil.copytree(run, copy)
    (copy / "best.safetensors").unlink()
    # finished: the summary measured the kept weights, which the last checkpoint need not hold
    with pytest.raises(IntegrityError, match=r"best.safetensors is missing from this finished run \(summary.json "
                                             r"records sha256 [0-9a-f]{12}\.\.\.\).*restore the file"):
        load_run(copy)
    (copy / "summary.json").unlink()   # a run stopped before it kept any weights
    hashed = []
    real_sha256 = io.sha256
    monkeypatch.setattr(io, "sha256", lambda path: hashed.append(path) or real_sha256(path))
    loaded = load_run(copy)
    assert len(hashed) == 1 and hashed[0] == loaded.weights   # checked against the record once, not hashed again
    assert loaded.weights.name == "model.safetensors" and loaded.weights_sha256 == real_sha256(loaded.weights)
    weights = loaded.weights.read_bytes()
    loaded.weights.write_bytes(weights[:-1] + bytes([weights[-1] ^ 1]))
    with pytest.raises(IntegrityError, match="differs from the sha256 its checkpoint recorded"):
        load_run(copy)


def test_weights_that_do_not_fit_the_runs_config_are_refused_in_one_line(run, tmp_path):
    """An edited config.json (or foreign weights without a record) used to end in torch's load_state_dict
    message: exit 1 and several KB naming every tensor."""
    import json
    import shutil

    from distill.training import load_run

    copy = tmp_path / run.name
    shutil.copytree(run, copy)
    config = json.loads((copy / "config.json").read_text())
    config["model"]["decoder_channels"] //= 2
    (copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(IntegrityError) as caught:
        load_run(copy)
    message = str(caught.value)
    assert message.startswith(f"{copy / 'best.safetensors'} does not hold the weights of the model its config describes: ")
    assert "tensors of other shapes (e.g. decoder." in message and f"restore {copy / 'config.json'}" in message
    assert len(message) < 600


@pytest.mark.parametrize("teacher, cache, align, asked, skipped", [
    ("synthetic-metric", "", "none", False, ""),                    # embedded: a second, always measured
    ("da3-metric", "", "none", False, "add eval.teacher=true"),     # a real ViT (maybe from the hub): only when asked
    ("da3-metric", "", "none", True, ""),
    ("da3-metric", "/data/cache", "none", True, "training-split labels only"),
    ("da2-metric", "", "dataset", True, "fitted the teacher's scale on its training split"),
])
def test_a_real_teacher_is_measured_only_when_asked(teacher, cache, align, asked, skipped):
    from dataclasses import replace

    from distill.recipes import get_recipe
    from distill.training.evaluation import teacher_skipped

    recipe = get_recipe("v3")
    recipe = replace(recipe, teacher=replace(recipe.teacher, name=teacher, cache=cache, align=align))
    why = teacher_skipped(recipe, asked=asked)
    assert (skipped in why) if skipped else why == ""


def test_the_newest_run_is_found_when_only_overrides_are_given(run, tmp_path, monkeypatch):
    from distill.evaluate import looks_like_override

    assert looks_like_override("data.seed=1") and not looks_like_override("runs/01-weighting=fixed/v3-x")
    out = tmp_path / "newest.json"
    assert evaluate_main(["data.num_val=4", "--runs-dir", str(run.parent), "--out", str(out), "--quiet"]) == 0
    result = json.loads(out.read_text())
    assert result["run"] == str(run) and result["images"] == 4
    after = tmp_path / "after.json"   # the run after an override is still the run, not a key
    assert evaluate_main(["data.num_val=4", str(run), "--out", str(after), "--quiet"]) == 0
    assert json.loads(after.read_text())["images"] == 4


def test_an_unsized_synthrooms_split_and_a_string_of_overrides_are_refused(run, capsys):
    from distill import evaluate_run
    assert evaluate_main([str(run), "data.num_val=None", "--quiet"]) == 2
    assert "data.num_val=None: SynthRooms renders the validation split at a size it must be given" in \
        capsys.readouterr().err
    with pytest.raises(ValueError, match=r"overrides='data.seed=1': give a list of key=value strings"):
        evaluate_run(run, overrides="data.seed=1")


def test_out_may_be_a_directory(run, tmp_path):
    assert evaluate_main([str(run), "data.num_val=4", "eval.teacher=false", "--out", str(tmp_path), "--quiet"]) == 0
    assert json.loads((tmp_path / "data.num_val=4_eval.teacher=false.json").read_text())["images"] == 4
    assert evaluate_main([str(run), "data.num_val=4", "eval.teacher=false", "--out", f"{tmp_path}/new/", "--quiet"]) == 0
    assert (tmp_path / "new" / "data.num_val=4_eval.teacher=false.json").is_file()   # a new folder, not a file "new"


def test_the_newest_run_is_the_last_to_finish_not_the_last_evaluated(tmp_path):
    import os

    from distill.training import find_run

    for name, finished in (("v3-20261201T000000Z", 1_000), ("v3-20261202T000000Z", 2_000)):
        (tmp_path / name).mkdir()
        for file in ("config.json", "summary.json", "best.safetensors"):
            (tmp_path / name / file).write_text("{}")
        os.utime(tmp_path / name / "summary.json", (finished, finished))
    (tmp_path / "v3-20261201T000000Z" / "evaluations").mkdir()   # an evaluation of the older run touches its folder
    assert find_run(None, tmp_path) == tmp_path / "v3-20261202T000000Z"


def test_another_recipes_newest_run_is_found_by_name_and_named_when_v3_has_none(tmp_path):
    import os

    from distill.training import RunNotFoundError, find_run

    # a second run started in the same second gets "-1"; "v4-lite-..." is another recipe's name, not v4's
    for name, finished in (("v4-20261201T000000Z", 1_000), ("v5-20261202T000000Z-1", 2_000),
                           ("v4-lite-20261203T000000Z", 3_000)):
        (tmp_path / name).mkdir()
        for file in ("config.json", "summary.json", "best.safetensors"):
            (tmp_path / name / file).write_text("{}")
        os.utime(tmp_path / name / "summary.json", (finished, finished))
    (tmp_path / "v3-20261203T000000Z").mkdir()   # started, never finished
    (tmp_path / "v3-20261203T000000Z" / "config.json").write_text("{}")
    for file in ("model.safetensors", "state.pt"):
        (tmp_path / "v3-20261203T000000Z" / "checkpoints" / "epoch-0001").mkdir(parents=True, exist_ok=True)
        (tmp_path / "v3-20261203T000000Z" / "checkpoints" / "epoch-0001" / file).write_text("")
    (tmp_path / "v3-20261203T000001Z").mkdir()   # refused by the pre-flight: no checkpoint, nothing to resume
    (tmp_path / "v3-20261203T000001Z" / "config.json").write_text("{}")
    assert find_run(None, tmp_path, "v4") == tmp_path / "v4-20261201T000000Z"
    assert find_run(None, tmp_path, "v5") == tmp_path / "v5-20261202T000000Z-1"
    with pytest.raises(RunNotFoundError) as refused:
        find_run(None, tmp_path)
    message = str(refused.value)
    assert "unfinished: v3-20261203T000000Z: resume" in message and "finished runs of v5, v4 are there" in message
    assert "(v3-20261203T000001Z stopped before their first checkpoint: nothing to resume or use)" in message
    assert "pick that recipe with --recipe v5" in message


def test_a_recipe_named_beside_a_run_must_be_the_runs(tmp_path):
    from distill.training import RunNotFoundError, find_run

    run = tmp_path / "v4-20261201T000000Z"
    run.mkdir()
    (run / "config.json").write_text('{"name": "v4"}')
    assert find_run(run, tmp_path) == run and find_run(run, tmp_path, "v4") == run
    with pytest.raises(RunNotFoundError, match="is a v4 run, but the recipe asked for is v3"):
        find_run(run, tmp_path, "v3")


def test_another_dataset_is_measured_on_its_own_split_and_a_missing_path_is_refused(tmp_path):
    from dataclasses import replace

    from core.config import ConfigError
    from distill.recipes import get_recipe
    from distill.training.evaluation import evaluation_recipe

    recipe = get_recipe("v3")
    recipe = replace(recipe, data=replace(recipe.data, dataset=f"folder:{tmp_path}", val_dataset="synthrooms",
                                          height=128, width=160, num_val=200))   # as a CPU run records it
    assert evaluation_recipe(recipe, ["data.num_val=4"]).data.val_dataset == "synthrooms"   # the run's own split
    assert evaluation_recipe(recipe, [f"data.dataset=nyu:{tmp_path}"]).data.val_dataset == ""
    with pytest.raises(ConfigError, match=f"data.dataset=nyu:{tmp_path / 'typo'}: .* does not exist"):
        evaluation_recipe(recipe, [f"data.dataset=nyu:{tmp_path / 'typo'}"])


def test_long_override_sets_keep_files_of_their_own():
    from distill.evaluate import default_output

    long = [f"data.root=/data/{'x' * 200}"]
    a, b = default_output(Path("r"), [*long, "data.seed=1"]), default_output(Path("r"), [*long, "data.seed=2"])
    assert a != b and len(a.name) == len(b.name) == 185 and a.parent == Path("r/evaluations")
    assert default_output(Path("r"), []).name == "validation.json"
    # two paths that read alike once made a file name keep two files
    x_y, x_dash_y = (default_output(Path("r"), [f"data.dataset=folder:/x{s}y"]) for s in ("/", "-"))
    assert x_y != x_dash_y and x_y.name.startswith("data.dataset=folder-x-y-")


def test_one_split_gets_one_file_however_its_overrides_are_ordered():
    from distill.evaluate import default_output

    one = default_output(Path("r"), ["data.seed=1", "data.num_val=1000"])
    assert one == default_output(Path("r"), ["data.num_val=1000", "data.seed=1"])
    assert one.name == "data.num_val=1000_data.seed=1.json"
    # a repeated key is named with the value that applies, its last, as the overrides are applied
    assert default_output(Path("r"), ["data.seed=2", "data.num_val=1000", "data.seed=1"]) == one
    assert default_output(Path("r"), ["data.seed=2"]) != default_output(Path("r"), ["data.seed=1"])


def test_evaluate_gives_the_model_back_in_the_mode_it_came_in():
    """Validation runs in eval mode and leaves the caller's mode alone: an eval-mode student came
    back training (BatchNorm on batch statistics, the training-only heads on)."""
    import torch

    from distill.recipes import get_recipe
    from distill.students import build_student
    from distill.training.evaluation import evaluate

    torch.manual_seed(0)
    model = build_student("mobilenetv3_small_050", decoder_channels=16)
    depth = torch.rand(2, 1, 32, 32) + 1
    batch = {"image": torch.rand(2, 3, 32, 32), "depth": depth, "valid": depth > 0,
             "seg": torch.zeros(2, 32, 32, dtype=torch.long)}
    for training in (False, True):
        model.train(training)
        assert "abs_rel" in evaluate(model, [batch], torch.device("cpu"), None, get_recipe("v3"))
        assert model.training is training
