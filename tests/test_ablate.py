"""The ablation harness: grid parsing and validation without training, the table, one tiny real grid."""
import json
from pathlib import Path

import pytest

from core.config import ConfigError
from distill.ablate import (Grid, best_rows, main, markdown_table, parse_grid, parse_seeds, seed_groups,
                            terminal_table, write_report)
from distill.recipes import get_recipe


def test_items_split_into_axes_and_common_overrides():
    grid = parse_grid(["distill.normalization=none,global,hybrid", "train.epochs=3", "distill.shared_crop=0, 1",
                       "model.tasks=depth|depth,seg", "data.height=64"], get_recipe("v3"))
    assert grid.axes == {"distill.normalization": ("none", "global", "hybrid"), "distill.shared_crop": ("0", "1"),
                         "model.tasks": ("depth", "depth,seg")}   # a tuple key: "|" separates alternatives
    assert grid.common == ("train.epochs=3", "data.height=64")
    combos = grid.combinations()
    assert len(combos) == 12
    assert combos[0] == {"distill.normalization": "none", "distill.shared_crop": "0", "model.tasks": "depth"}
    # the first axis is the slowest
    assert combos[1]["model.tasks"] == "depth,seg" and combos[-1]["distill.normalization"] == "hybrid"
    single = parse_grid(["model.tasks=depth,seg", "loss.weighting=fixed,kendall"], get_recipe("v3"))
    assert single.common == ("model.tasks=depth,seg",) and list(single.axes) == ["loss.weighting"]


@pytest.mark.parametrize("items, message", [
    (["train.epochs=3"], "nothing to ablate"),
    (["loss.weighting=fixed,kendall", "loss.weighting=dwa,fixed"], '"loss.weighting" is given twice'),
    (["loss.weighting"], "is not key=value"),
    (["loss.weighting=fixed,,kendall"], "empty alternative"),
    (["out_dir=x", "loss.weighting=fixed,kendall"], "--out places the runs"),
    (["name=v4", "loss.weighting=fixed,kendall"], "the recipe is the first argument"),
    (["train.seed=1,2,2"], '"train.seed=1,2,2" gives one value twice'),
    (["train.seed=0,00"], r"gives one value twice \(0, 0\)"),   # the same seed, spelled twice
])
def test_bad_grids_are_refused(items, message):
    with pytest.raises(ConfigError, match=message):
        parse_grid(items, get_recipe("v3"))


@pytest.mark.parametrize("args, message", [
    (["distill.normalisation=none,hybrid"],
     'unknown key "distill.normalisation". Did you mean "distill.normalization"?'),
    (["distill.normalization=none,median"], "distill.normalization='median': must be one of"),
    (["loss.weighting=fixed,kendall", "train.epochs=three"], "train.epochs='three': expected int"),
    (["loss.weighting=fixed,kendall", "--metrics", "abs_rel,d_1"], 'unknown metric "d_1". Did you mean "d1"?'),
    (["loss.weighting=fixed,kendall", "teacher.cache=/x", "distill.shared_crop=0.5,0"],
     "combination 01-weighting=fixed_shared_crop=0.5: distill.shared_crop need(s) the teacher online"),
    (["loss.weighting=fixed,kendall", "teacher.cache=/x"],   # a cache is opened (its manifest) before any run
     "combination 01-weighting=fixed: teacher.cache=/x is not a pseudo-label cache"),
    (["loss.weighting=fixed,kendall", "--heldout", "model.decoder_channels=8"],
     "--heldout: model.decoder_channels=8: an evaluation changes only data.* and eval.* keys"),
    (["loss.weighting=fixed,kendall", "--heldout", "data.num_val=0"], "--heldout: data.num_val=0 must be at least 1"),
    (["loss.weighting=fixed,kendall", "--heldout", "data.seed"], '--heldout: "data.seed" is not key=value'),
    (["loss.weighting=fixed,kendall", "--heldout", "data.num_val=1000"],
     "that is the validation split of a run it would measure (synthrooms, data.seed=0)"),
    (["data.seed=0,1", "--heldout", "data.seed=1"], "add data.seed=2"),
    # a run's own validation scenes, named through val_dataset: not held out
    (["loss.weighting=fixed,kendall", "--heldout", "data.val_dataset=synthrooms"],
     "that is the validation split of a run it would measure"),
    # the device's batch of 8 (CPU) is filled in before the check, as distill.run does
    (["loss.weighting=fixed,kendall", "data.num_train=6"], "data.num_train=6 is smaller than train.batch_size=8"),
    (["loss.weighting=fixed,kendall", "--metrics", "abs_rel,heldout_abs_rel"], "heldout_* metrics need --heldout"),
])
def test_invalid_grids_exit_2_before_any_run(tmp_path, capsys, args, message):
    assert main(["v3", *args, "--out", str(tmp_path / "out")]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_the_fit_and_teacher_gap_metrics_of_a_run_can_be_tabulated():
    from distill.ablate import DIRECTION
    from distill.training.evaluation import FIT_KEYS

    assert all(f"train_{k}" in DIRECTION for k in FIT_KEYS) and "gap_closed" in DIRECTION
    assert DIRECTION["train_abs_rel"] == DIRECTION["abs_rel"] and DIRECTION["train_miou"] == DIRECTION["miou"]


def test_dry_run_lists_the_combinations(tmp_path, capsys):
    assert main(["v3", "distill.normalization=none,global,hybrid,local", "distill.shared_crop=0,1",
                 "train.epochs=3", "--dry-run", "--out", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert "8 runs (distill.normalization x distill.shared_crop)" in out
    assert ("08-normalization=local_shared_crop=1: train.epochs=3 distill.normalization=local "
            "distill.shared_crop=1") in out
    assert not (tmp_path / "out").exists()


def row(values, status="ok", **metrics):
    return {"values": values, "overrides": [], "status": status,
            "error": "ValueError: boom" if status == "failed" else None, "run_dir": None,
            "wall_s": metrics.pop("wall_s", 10.0), "metrics": metrics}


def test_best_value_per_metric_is_marked(tmp_path):
    rows = [row({"k": "a"}, abs_rel=0.20, d1=0.70, s_star=1.30, miou=0.31),
            row({"k": "b"}, abs_rel=0.10, d1=0.60, s_star=0.95, miou=0.310004),   # ties a at 4 decimals
            row({"k": "c"}, "failed", abs_rel=0.01),                                # failed rows never win
            row({"k": "d"}, "pending")]
    assert best_rows(rows, "abs_rel") == {1} and best_rows(rows, "d1") == {0}
    assert best_rows(rows, "s_star") == {1}                     # closest to 1
    scales = [row({"k": "a"}, s_star=0.8), row({"k": "b"}, s_star=1.25), row({"k": "c"}, s_star=1.24)]
    assert best_rows(scales, "s_star") == {2} and best_rows(scales[:2], "s_star") == {0, 1}   # by |log s|
    assert best_rows(rows, "miou") == {0, 1} and best_rows(rows, "wall_s") == {0, 1}
    md = markdown_table(rows, ["k"], ["abs_rel", "d1", "s_star"], tmp_path)
    lines = md.splitlines()
    assert lines[0] == "| k | abs_rel | d1 | s_star | wall_s | run |"
    assert "| a | 0.2000 | **0.7000** | 1.3000 |" in lines[2]
    assert "| b | **0.1000** | 0.6000 | **0.9500** |" in lines[3]
    assert lines[4] == "| c | - | - | - | 10 | FAILED ValueError: boom |"
    assert lines[5] == "| d | - | - | - | - | pending |"
    assert "0.1000*" in terminal_table(rows, ["k"], ["abs_rel"], tmp_path)
    assert "**" not in markdown_table(rows[1:3], ["k"], ["abs_rel"], tmp_path)   # a lone figure beats nothing
    grid = Grid({"k": ("a", "b", "c", "d")}, ("train.epochs=1",))
    write_report(tmp_path, "v3", grid, ["abs_rel", "d1"], rows)
    saved = json.loads((tmp_path / "ablation.json").read_text())
    assert saved["best"] == {"abs_rel": [1], "d1": [0], "wall_s": [0, 1]} and len(saved["runs"]) == 4
    assert markdown_table(rows, ["k"], ["abs_rel", "d1"], tmp_path) in (tmp_path / "ablation.md").read_text()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]            # no temp file left


def test_seeds_average_each_row_with_its_spread(tmp_path):
    grid = parse_grid(["k=a,b"], get_recipe("v3"), parse_seeds("3"))
    assert grid.axes == {"k": ("a", "b"), "train.seed": ("0", "1", "2")}     # the seed axis last
    rows = [row({"k": "a", "train.seed": "0"}, abs_rel=0.20), row({"k": "a", "train.seed": "1"}, abs_rel=0.22),
            row({"k": "a", "train.seed": "2"}, abs_rel=0.24),
            row({"k": "b", "train.seed": "0"}, abs_rel=0.10), row({"k": "b", "train.seed": "1"}, "failed"),
            row({"k": "b", "train.seed": "2"}, abs_rel=0.14)]
    a, b = seed_groups(rows, list(grid.axes))
    assert a["metrics"]["abs_rel"] == pytest.approx(0.22) and a["sd"]["abs_rel"] == pytest.approx(0.02)
    assert (a["n"], a["status"], b["n"], b["status"], b["seeds"]) == (3, "ok", 2, "partial", ["0", "2"])
    assert b["metrics"]["abs_rel"] == pytest.approx(0.12) and b["sd"]["abs_rel"] == pytest.approx(0.02 * 2 ** 0.5)
    write_report(tmp_path, "v3", grid, ["abs_rel"], rows)
    md = (tmp_path / "ablation.md").read_text()
    assert "| a | 0.2200 ± 0.0200 | 10 | 3/3 seeds (0, 1, 2) |" in md
    # b's mean is over two seeds of three: shown, not ranked against a's three (a lone figure beats nothing)
    assert "| b | 0.1200 ± 0.0283 | 10 | 2/3 seeds (0, 2); FAILED ValueError: boom |" in md
    assert "## Every run" in md and json.loads((tmp_path / "ablation.json").read_text())["best"]["abs_rel"] == []
    assert best_rows([b, {**b, "metrics": {"abs_rel": 0.3}}], "abs_rel") == {0}   # partial rows among themselves
    for bad in ("x", "0,0", "0"):
        with pytest.raises(ConfigError, match="--seeds"):
            parse_seeds(bad)
    assert parse_seeds("") == ()   # no --seeds: the grid's own seed
    with pytest.raises(ConfigError, match="not both"):
        parse_grid(["k=a,b", "train.seed=1,2"], get_recipe("v3"), ("0", "1"))
    assert parse_seeds("4,7") == ("4", "7")


TINY = ["train.epochs=1", "data.num_train=16", "data.num_val=4", "data.height=32", "data.width=32",
        "model.student=mobilenetv3_small_050", "model.decoder_channels=16", "eval.preview_images=1"]


def test_a_tiny_real_grid_runs_records_failures_and_goes_on(tmp_path, capsys):
    # loss.weighting works in training today; a learning rate of 1e30 diverges at once (the grid goes on)
    out = tmp_path / "out"
    assert main(["v3", "loss.weighting=fixed,kendall", "train.lr_decoder=0.002,1e30", *TINY,
                 f"data.root={tmp_path / 'data'}", "--out", str(out)]) == 1
    saved = json.loads((out / "ablation.json").read_text())
    runs = saved["runs"]
    assert [r["values"] for r in runs] == [{"loss.weighting": w, "train.lr_decoder": lr}
                                           for w in ("fixed", "kendall") for lr in ("0.002", "1e30")]
    assert [r["status"] for r in runs] == ["ok", "failed", "ok", "failed"]
    assert "NaN/inf" in runs[1]["error"] or "non-finite loss" in runs[1]["error"]
    for r in (runs[0], runs[2]):
        summary = json.loads((tmp_path / r["run_dir"] / "summary.json").read_text())
        assert r["metrics"]["abs_rel"] == summary["abs_rel"] and 0 < summary["abs_rel"] < 1
        assert r["wall_s"] > 0 and str(out) in r["run_dir"]
    config = json.loads((tmp_path / runs[2]["run_dir"] / "config.json").read_text())
    assert config["loss"]["weighting"] == "kendall" and config["data"]["height"] == 32
    best = saved["best"]["abs_rel"]
    assert best and set(best) <= {0, 2}
    md = (out / "ablation.md").read_text()
    assert md.count("**") >= 2 * 4 and "| fixed | 0.002 |" in md and "FAILED " in md
    assert "(* best per metric)" in capsys.readouterr().out
    assert (out / "01-weighting=fixed_lr_decoder=0.002" / "train.log").read_text().count("pre-flight") == 1


def test_a_grid_value_that_cannot_train_is_refused_before_the_first_run(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["v3", "train.batch_size=8,64", *TINY, f"data.root={tmp_path / 'data'}", "--out", str(out)]) == 2
    assert "data.num_train=16 is smaller than train.batch_size=64" in capsys.readouterr().err
    assert not (tmp_path / "data").exists() and not (out / "ablation.json").exists()


def test_heldout_measures_every_run_on_a_second_split(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["v3", "train.lr_decoder=0.002,0.004", *TINY, f"data.root={tmp_path / 'data'}", "--out", str(out),
                 "--heldout", "data.seed=1 data.num_val=6"]) == 0
    saved = json.loads((out / "ablation.json").read_text())
    assert saved["metrics"][-2:] == ["heldout_abs_rel", "heldout_miou"]   # joined the default metrics
    for row in saved["runs"]:
        run = tmp_path / row["run_dir"]
        written = json.loads((run / "evaluations" / "data.num_val=6_data.seed=1.json").read_text())
        assert written["images"] == 6 and row["metrics"]["heldout_abs_rel"] == written["abs_rel"]
        assert row["metrics"]["heldout_abs_rel"] != row["metrics"]["abs_rel"]   # other rooms, other figures
    assert "heldout_abs_rel" in (out / "ablation.md").read_text()


def test_a_failed_heldout_keeps_the_trained_run_and_a_used_out_is_refused(tmp_path, capsys):
    out, empty = tmp_path / "out", tmp_path / "no-images"
    empty.mkdir()   # exists, so the grid starts; holds no image, so the held-out measurement fails after training
    assert main(["v3", "--seeds", "1", *TINY, f"data.root={tmp_path / 'data'}", "--out", str(out),
                 "--heldout", f"data.dataset=folder:{empty} data.val_dataset=synthrooms data.seed=1"]) == 1
    (row,) = json.loads((out / "ablation.json").read_text())["runs"]
    assert row["status"] == "ok" and row["error"].startswith("--heldout: ") and 0 < row["metrics"]["abs_rel"] < 1
    assert "heldout_abs_rel" not in row["metrics"] and "; FAILED --heldout" in (out / "ablation.md").read_text()
    capsys.readouterr()
    assert main(["v3", "--seeds", "1", *TINY, "--out", str(out)]) == 2
    assert "already holds an ablation" in capsys.readouterr().err


def test_an_ablation_being_written_by_another_process_is_refused(tmp_path, capsys):
    from core.lock import exclusive
    out = tmp_path / "out"
    with exclusive(out / ".ablation.lock", "a test's ablation"):   # as another distill.ablate holds it
        assert main(["v3", "--seeds", "2", *TINY, "--out", str(out), "--resume"]) == 2
    assert f"ablation {out} is being written by process" in capsys.readouterr().err
    assert not (out / "ablation.json").exists()


def test_resume_keeps_finished_rows_and_continues_a_stopped_run(tmp_path, capsys):
    """A grid stopped in its second row: --resume keeps the first row's run, continues the second
    from its checkpoint (no new run folder), and refuses a command of another grid."""
    out = tmp_path / "out"
    two_epochs = [item for item in TINY if not item.startswith("train.epochs=")] + ["train.epochs=2"]
    args = ["v3", "train.lr_decoder=0.002,0.004", *two_epochs, f"data.root={tmp_path / 'data'}", "--out", str(out)]
    assert main(args) == 0
    saved = json.loads((out / "ablation.json").read_text())
    first, second = (tmp_path / row["run_dir"] for row in saved["runs"])
    figures = [row["metrics"]["abs_rel"] for row in saved["runs"]]
    # as if stopped after the second run's last checkpoint, before its summary: the row pending
    for name in ("summary.json", "report.md", "preview.png"):
        (second / name).unlink()
    saved["runs"][1].update(status="pending", run_dir=None, metrics={})
    (out / "ablation.json").write_text(json.dumps(saved))
    first_log = (first.parent / "train.log").read_text()

    capsys.readouterr()
    assert main(["v3", "train.lr_decoder=0.002,0.004", *TINY, f"data.root={tmp_path / 'data'}", "--out", str(out),
                 "--resume"]) == 2
    assert "is another grid (common differ)" in capsys.readouterr().err
    (out / "ablation.json").write_text(json.dumps({k: v for k, v in saved.items() if k != "runs"}))   # edited by hand
    assert main([*args, "--resume"]) == 2
    assert "has no rows of runs: it was not written by distill.ablate" in capsys.readouterr().err
    (out / "ablation.json").write_text(json.dumps(saved))
    assert main([*args, "--resume"]) == 0
    assert "finished before, kept" in capsys.readouterr().out
    assert (first.parent / "train.log").read_text() == first_log                   # not trained again
    assert f"resumed {second} from epoch-0002" in (second.parent / "train.log").read_text()
    assert len(list(second.parent.glob("v3-*"))) == 1 and (second / "summary.json").is_file()
    rows = json.loads((out / "ablation.json").read_text())["runs"]
    assert [row["metrics"]["abs_rel"] for row in rows] == figures                  # the same runs, to the digit
    # the row's time is the whole run's (its summary's wall_s), not only the resumed process's share
    whole = json.loads((second / "summary.json").read_text())["wall_s"]
    assert whole <= rows[1]["wall_s"] < whole + 2 and rows[1]["wall_s"] > 0.5 * saved["runs"][1]["wall_s"]

    # the first row trained before a default changed (as runs before train.shuffle_stride existed):
    # the rows left to train would follow another rule than it, so the resume is refused
    config = first / "config.json"
    recorded = json.loads(config.read_text())
    config.write_text(json.dumps({**recorded, "train": {k: v for k, v in recorded["train"].items()
                                                        if k != "shuffle_stride"}}))
    capsys.readouterr()
    assert main([*args, "--resume"]) == 2
    err = capsys.readouterr().err
    assert (f"--resume: row {first.parent.name} trained with train.shuffle_stride=1 (now 1000003), which this "
            f"command no longer builds") in err and "start the grid again in another --out" in err, err
    config.write_text(json.dumps(recorded))

    (out / "ablation.json").rename(tmp_path / "moved-away.json")   # a new grid there: nothing left is reused
    assert main(args) == 0
    assert all(len(list((out / Path(row["run_dir"]).parent.name).glob("v3-*"))) == 2 for row in rows)
