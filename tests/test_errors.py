"""The bad-input matrix: every command answers a user's mistake with exit status 2 and one line
`error: ...` naming the problem, never a traceback, and before any expensive work (no dataset is
rendered, no run or export directory appears). `--debug` (or DENSEKIT_DEBUG=1) shows the traceback."""
from __future__ import annotations

import importlib
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def place(tmp_path, monkeypatch):
    """A working directory with a file, an empty folder, a finished-looking run with a broken config."""
    monkeypatch.setenv("DENSEKIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a_file").write_text("not a directory")
    (tmp_path / "empty").mkdir()
    (tmp_path / "m.mlpackage").mkdir()
    (tmp_path / "dir.tflite").mkdir()   # a folder named like an artefact
    for name, config in (("bad-json", "{not json"), ("bad-type", json.dumps({"name": "v3", "train": {"epochs": "x"}})),
                         ("a-v3-run", json.dumps({"name": "v3"}))):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(config)
    return tmp_path


CASES = [
    # (module, argv, what the one line must say)
    ("distill.run", ["v3", "train.batch_size=0"], "train.batch_size=0 must be at least 1"),
    ("distill.run", ["v3", "data.num_train=4"], "data.num_train=4 is smaller than train.batch_size=8"),
    ("distill.run", ["v3", "data.height=80"], "data.height=80 must be a positive multiple of 32"),
    ("distill.run", ["v3", "train.epochs=-1"], "train.epochs=-1 must be at least 1"),
    ("distill.run", ["v3", "eval.best_metric=bogus"], "eval.best_metric='bogus'"),
    ("distill.run", ["v3", "train.epoch=3"], 'Did you mean "train.epochs"?'),
    ("distill.run", ["v9"], 'Unknown recipe "v9"'),
    ("distill.run", ["v3", "out_dir=a_file/runs"], "a_file is a file, not a directory"),
    ("distill.run", ["v3", "resume=empty"], "no config.json there"),
    ("distill.run", ["v3", "resume=bad-json"], "bad-json/config.json cannot be read as a run's config"),
    ("distill.run", ["v3", "resume=bad-type"], "train.epochs='x': expected"),
    ("distill.run", ["v4", "resume=a-v3-run"], "resume=a-v3-run is a v3 run, not v4; continue it with "
                                                "python -m distill.run v3 resume=a-v3-run"),
    ("distill.run", ["v3", "--bogus"], "unrecognized arguments: --bogus"),
    ("distill.run", ["v3", "--quiet", "train.epochs=-1"], "train.epochs=-1 must be at least 1"),  # flags anywhere
    ("distill.run", ["v3", "loss.depth=berhoo"], "loss.depth='berhoo' is not a depth loss; valid:"),
    ("distill.run", ["v3", "loss.weighting=kendal"], 'Did you mean "kendall"?'),
    ("distill.run", ["v3", "model.student=mobilenetv4"], "model.student='mobilenetv4' is not a student"),
    ("distill.run", ["v3", "teacher.name=da3"], "teacher.name='da3' is not a teacher"),
    ("distill.run", ["v3", "loss.berhu_threshold=p800"], "loss.berhu_threshold: Unknown berHu threshold 'p800'"),
    ("distill.run", ["v3", "model.tasks=depth,normals"], "model.tasks='depth,normals' must be depth or depth,seg"),
    ("distill.run", ["v3", "model.tasks=seg"], "a student without depth is not supported"),
    ("distill.run", ["v3", "distill.shared_crop=0.05", "distill.crop_min=0"], "distill.crop_min=0.0 must be in (0, 1]"),
    ("distill.run", ["v3", "distill.shared_crop=1.5"], "distill.shared_crop=1.5 must be in [0, 1]"),
    ("distill.run", ["v3", "distill.local_global_weight=1", "distill.local_global_grid=0"],
     "distill.local_global_grid=0 must be >= 1"),
    ("distill.run", ["v3", "train.device=gpu"], "train.device='gpu' must be auto, cpu, cuda or cuda:N"),
    ("distill.run", ["v3", "eval.eigen_crop=true"], "eval.eigen_crop=true is defined at 480x640 only, and the data is "
                                                    "128x160"),   # device-sized, then checked before rendering
    ("distill.run", ["v3", "eval.min_depth=5", "eval.max_depth=2"], "must satisfy 0 < min < max"),
    ("distill.run", ["v3", "train.grad_clip=-1"], "train.grad_clip=-1.0 must be >= 0 (0 = off)"),
    ("distill.run", ["v3", "teacher.input_size=500"], "teacher.input_size=500 must be a positive multiple of 14 (the ViT patch), e.g. 490"),
    ("distill.run", ["v3", "model.decoder_channels=1"], "model.decoder_channels=1 must be at least 2"),
    ("distill.run", ["v3", "train.log_every=0"], "train.log_every=0 must be at least 1"),
    ("distill.run", ["v3", "train.seed=-1"], "train.seed=-1 must be >= 0"),
    ("distill.run", ["v3", "data.val_dataset=nyu:/no/such/nyu"],
     "data.val_dataset=nyu:/no/such/nyu: /no/such/nyu does not exist"),   # before SynthRooms renders 4,000
    ("distill.run", ["v3", "data.val_dataset=synthroom"], 'Did you mean "synthrooms"?'),
    ("distill.run", ["v5", "distill.feature_weight=0.1"], "drop teacher.assistant or set distill.feature_weight=0"),
    # what the teacher section names is known before any image is rendered (its class, or its cache's manifest)
    ("distill.run", ["v3", "distill.feature_weight=0.1"],
     "teacher.name=synthetic-metric has none (da2-metric, da2-relative have them, run online)"),
    ("distill.run", ["v3", "teacher.name=synthetic-relative", "teacher.align=dataset"],
     "teacher.align=dataset scales metric depth, but teacher.name=synthetic-relative outputs relative"),
    ("distill.run", ["v3", "teacher.assistant=synthetic-relative"], "pick an assistant in the same space"),
    ("distill.run", ["v3", "teacher.cache=empty"], "teacher.cache=empty is not a pseudo-label cache (no manifest.json)"),
    ("distill.run", ["v3", "data.dataset=synthrooms:empty"],   # the path was ignored: a new render elsewhere
     "data.dataset='synthrooms:empty': synthrooms is rendered, not read from a path; write data.dataset=synthrooms"),
    ("distill.run", ["v3", "data.dataset=folder:empty", "data.val_dataset=synthrooms:empty"],
     "data.val_dataset='synthrooms:empty': synthrooms is rendered"),
    # a real teacher's source and package, before the datasets are built (the load came after them)
    ("distill.run", ["v3", "teacher.name=da2-metric"], "da2-metric needs teacher.source=<a local directory or a hub id>"),
    ("distill.run", ["v3", "teacher.name=da2-metric", "teacher.source=empty"],
     "teacher.source=empty is a directory without config.json and weights (*.safetensors or *.bin), so not a "
     "da2-metric checkpoint"),
    ("distill.run", ["v3", "teacher.name=da3-metric", "teacher.source=depth-anything/DA3METRIC-LARGE"],
     "teacher da3-metric needs the depth_anything_3 package"),
    ("distill.run", ["v3", "teacher.assistant=da2-metric"], "da2-metric needs teacher.assistant_source=<a local"),
    ("distill.run", ["v3", "model.pretrained=no/such.safetensors"], "model.pretrained=no/such.safetensors: no such file"),
    ("distill.run", ["v3", "data.val_dataset=nyu"], "data.val_dataset='nyu' needs a path"),
    ("distill.run", ["v3", "data.val_dataset=folder:empty"], "an image folder has no ground truth to validate on"),
    ("distill.run", ["v3", "resume=a-v3-run"], "resume=a-v3-run: no complete checkpoint under"),
    ("distill.run", ["v3", "name=v4"], "name=v4: the recipe's name is not a key; the recipe is the first argument"),
    ("distill.run", ["v3", "data.seed=-2"], "data.seed=-2 must be >= 0"),
    ("distill.run", ["v3", "train.lr_encoder=nan"], "train.lr_encoder='nan': expected a finite number"),
    ("distill.ablate", ["v3", "loss.depth=berhu,silgo"], "loss.depth='silgo' is not a depth loss"),
    ("distill.cache_teacher", ["synthetic-metric", "data=synthrooms"], "out=DIR is required"),
    ("distill.cache_teacher", ["synthetic-metrik", "out=c"], 'is not a teacher; valid: da2-metric'),
    ("distill.cache_teacher", ["synthetic-metric", "out=c", "shard_size=0"], "shard_size=0: must be at least 1"),
    ("distill.cache_teacher", ["synthetic-metric", "out=c", "data.height=80"], "data.height=80 must be a positive"),
    ("distill.cache_teacher", ["synthetic-metric", "out=c", "device=tpu"], "device=tpu: use auto, cpu, cuda or cuda:N"),
    ("distill.cache_teacher", ["da2-metric", "out=c"], "da2-metric needs teacher.source"),   # refused under the lock
    ("distill.cache_teacher", ["da2-metric", "out=new/nested/c"], "da2-metric needs teacher.source"),   # every folder
    ("distill.ablate", ["v3", "train.epochs=1,2", "--resume", "--out", "elsewhere"],
     "--resume: elsewhere holds no ablation.json"),
    ("distill.cache_teacher", ["synthetic-metric", "out=a_file/c"], "error: out=a_file/c: a_file is a file, not a directory"),
    ("distill.evaluate", ["--runs-dir", "empty"], "no finished v3 run under"),
    ("distill.evaluate", ["--recipe", "v33"], 'Unknown recipe "v33"'),
    ("distill.evaluate", ["empty"], "RUN empty: no config.json there"),
    ("distill.evaluate", ["nowhere"], "RUN nowhere: it does not exist"),
    ("distill.run", ["v3", "resume=nowhere"], "resume=nowhere: it does not exist"),
    ("distill.run", [], "give a recipe to train, e.g. python -m distill.run v3 (the recipes: v1, "),   # help, no error line
    ("distill.evaluate", ["--runs-dir", "a_file"], "--runs-dir a_file is a file; give the folder"),
    ("distill.evaluate", ["bad-json"], "bad-json has no best.safetensors"),
    ("distill.evaluate", ["bad-type", "--recipe", "v4"], "bad-type is a v3 run, but the recipe asked for is v4"),
    ("distill.evaluate", ["bad-json", "model.decoder_channels=8"], "an evaluation changes only data.* and eval.*"),
    ("distill.evaluate", ["bad-json", "--out", "a_file/x.json"], "a_file is a file, not a directory"),
    ("distill.evaluate", ["bad-json", "data.num_val"], "data.num_val: an override needs a value, e.g. data.num_val=<value>"),
    # the run's own files: `--out <run>/best.safetensors` replaced the weights with the JSON result
    ("distill.evaluate", ["bad-json", "--out", "bad-json/config.json"], "--out bad-json/config.json is a file this command reads"),
    ("distill.evaluate", ["bad-json", "--out", "bad-json/best.safetensors"], "the result is JSON; give a file name ending in .json"),
    ("distill.ablate", ["v3"], "nothing to ablate"),
    ("distill.ablate", ["v3", "train.epochs=1,2", "--out", "a_file/x"], "a_file is a file, not a directory"),
    ("distill.ablate", ["v3", "train.batch_size=8,64", "data.num_train=16"], "smaller than train.batch_size=64"),
    ("quant.export", ["--target", "tflitee"], 'unknown target "tflitee"'),
    ("quant.export", ["--target", "tflite", "--check", "0"], "--check 0: must be at least 1"),
    ("quant.export", ["--target", "tflite", "--qat-steps", "-1"], "--qat-steps -1: must be at least 0"),
    ("quant.export", ["--target", "tflite", "--threads", "-1"], "--threads -1: must be at least 0"),
    ("quant.export", ["--target", "tflite", "--float-stem", "-1"], "--float-stem -1: must be at least 0"),
    ("quant.sensitivity", ["--images", "0"], "--images 0: must be at least 1"),
    ("quant.sensitivity", ["--runs-dir", "nowhere"], "no finished v3 run"),
    ("quant.sensitivity", ["--recipe", "v4", "--runs-dir", "nowhere"], "no finished v4 run"),
    ("quant.export", ["--target", "tflite", "--tolerance", "fp9.abs_rel_change=1"], "--tolerance for fp9: no such precision"),
    ("quant.export", ["--target", "tflite", "--tolerance", "int8.abs_rel_change=-0.1"],
     "--tolerance int8: gate tolerances must be finite non-negative numbers"),
    ("quant.export", ["--target", "tflite", "--tolerance", "int8.miou_drop_pt=nan"],
     "--tolerance int8: gate tolerances must be finite non-negative numbers"),
    ("quant.export", ["--target", "tflite", "--tolerance", "fp16.seg_agreement_min=99.9"],   # a gate no file passes
     "--tolerance fp16: seg_agreement_min=99.9 is a share of pixels in [0, 1] (e.g. 0.999 for 99.9%)"),
    ("quant.export", ["--target", "tflite", "--tolerance", "int8.miou_drop_pt=150"],
     "--tolerance int8: miou_drop_pt=150 is in mIoU points, at most 100"),
    ("quant.export", ["--target", "tflite", "--input-size", "100x100"], "multiples of 32"),
    ("quant.export", ["--target", "tflite", "--float-ops", "DIV,RESIZE_BILINEA"],
     '--float-ops RESIZE_BILINEA: not a TFLite op type'),
    ("quant.export", ["--target", "tflite", "--prune-lr", "0"], "--prune-lr 0.0: must be positive and finite"),
    ("quant.export", ["--target", "tflite", "--qat-lr", "inf"], "--qat-lr inf: must be positive and finite"),
    ("quant.export", ["--target", "tflite", "--prune", "macs=1x"], '--prune: MAC fraction "macs=1x" must be in (0, 1): 1x or more prunes nothing'),
    ("quant.export", ["--target", "tflite", "--prune", "macs=0x"], '--prune: MAC fraction "macs=0x" must be in (0, 1): 0x leaves no MACs'),
    ("quant.export", ["--target", "tflite", "--prune", "1.5"], '--prune: prune ratio "1.5" (the share of channels removed) must be in (0, 1)'),
    ("quant.export", ["--target", "tflite", "--prune", "0.3", "--prune-stages", "2"],
     '--prune-stages 2: iterative pruning needs a MAC target'),
    ("quant.export", ["--target", "tflite", "--prune", "0.3", "--prune-importance", "random"],
     '--prune-importance "random": use one of magnitude, bn_scale, taylor'),
    ("quant.export", ["--target", "tflite", "--out", "a_file/exports"], "a_file is a file, not a directory"),
    ("quant.export", ["--target", "tflite", "--runs-dir", "empty"], "no finished v3 run under"),
    ("quant.export", ["--target", "tflite", "--recipe", "v33"], 'Unknown recipe "v33"'),
    ("quant.export", ["--target", "tflite", "--run", "empty"], "--run empty: no config.json there"),
    ("quant.export", ["--target", "tflite", "--run", "bad-json"], "bad-json has no best.safetensors"),
    ("quant.compression", ["empty"], "empty: no finished export there; make one with python -m quant.export"),
    ("quant.compression", ["nowhere"], "nowhere does not exist; give the folder quant.export wrote a run's exports to"),
    ("quant.compression", ["a_file"], "a_file is a file; give the folder quant.export wrote"),
    ("quant.compression", ["empty", "--format", "tfilte"], "argument --format: invalid choice: 'tfilte'"),
    ("quant.compression", ["empty", "--format", "onnx"],
     "empty: no finished export there of format onnx; make one with python -m quant.export --target onnx"),
    ("quant.verify", ["empty"], "empty is not an export directory (no manifest.json in it or below)"),
    ("quant.verify", ["a_file"], "a_file is not a directory"),
    ("edge.run", ["m.tflite", "--inputs", "x.npy", "--out", "o.npz"], "m.tflite: it does not exist"),
    ("edge.run", ["m.pt", "--inputs", "x.npy", "--out", "o.npz"], "unknown artefact suffix '.pt'"),
    ("edge.run", ["m.tflite", "--inputs", "x.npy", "--out", "a_file/o.npz"], "a_file is a file, not a directory"),
    ("edge.run", ["m.tflite", "--inputs", "x.npy", "--out", "o.npz", "--threads", "-1"], "--threads -1"),
    ("edge.run", ["--inputs", "x.npy", "m.tflite", "--out", "o.npz"],
     "the artefact comes first: python -m edge.run m.tflite --inputs ... (--inputs took it)"),
    ("edge.run", ["--inputs", "x.npy", "--out", "o.npz"], "the following arguments are required: artefact"),
    *([("edge.run", ["m.mlpackage", "--inputs", "x.npy", "--out", "o.npz", "--executor", "predict"],
        "--executor predict (MLModel.predict) needs macOS")] if sys.platform != "darwin" else []),
    ("edge.bench", ["m.tflite"], "m.tflite: it does not exist"),
    ("edge.bench", ["dir.tflite"], "cannot run dir.tflite: it is a directory, and a TFLite artefact is a file"),
    ("edge.run", ["dir.tflite", "--inputs", "x.npy", "--out", "o.npz"], "dir.tflite: it is a directory"),
    ("edge.bench", ["m.tflite", "--runs", "0"], "--runs 0: must be at least 1"),
    ("edge.bench", ["m.tflite", "--warmup", "-1"], "--warmup -1: must be at least 0"),
    ("edge.bench", ["m.tflite", "--threads", "-1"], "--threads -1: must be at least 1"),
    ("edge.bench", ["a.tflite", "--threads", "2", "b.tflite"], "a.tflite: it does not exist"),  # flags anywhere
    ("edge.peak", ["--threads", "0"], "--threads 0: must be at least 1"),
    ("edge.peak", ["--size", "100000"], "--size 100000: at most 8192 (its matrices alone take 186.3 GiB"),
    ("edge.bench", ["m.tflite", "--threads", "100000"], "--threads 100000: at most"),   # aborted allocating them
    ("quant.export", ["--target", "tflite", "--threads", "100000"], "--threads 100000: at most"),
    ("edge.run", ["m.tflite", "--inputs", "x.npy", "--out", "o.npz", "--threads", "100000"], "--threads 100000: at most"),
    ("edge.op_profile", ["m.tflite", "--top", "0"], "--top 0: must be at least 1"),   # -1 listed every op but one
    ("edge.peak", ["--json", "a_file/p.json"], "a_file is a file, not a directory"),
    ("edge.op_profile", ["m.onnx"], "m.onnx: edge.op_profile takes an existing .tflite file"),
    ("edge.op_profile", ["m.tflite", "--runs", "0"], "--runs 0: must be at least 1"),
    ("edge.section_profile", ["m.onnx"], "m.onnx: edge.section_profile takes existing .tflite files"),
    ("edge.section_profile", ["m.tflite", "--sections", "0"], "--sections 0: must be at least 1"),
]


def run_main(module: str, argv: list[str]) -> int:
    try:
        return importlib.import_module(module).main(argv)
    except SystemExit as exit_:   # argparse's own refusals
        return exit_.code


@pytest.mark.parametrize("module, argv, message", CASES, ids=[f"{m}:{' '.join(a)}" for m, a, _ in CASES])
def test_bad_input_is_one_error_line_and_exit_2(module, argv, message, place, capsys):
    # a lock file may stay in a folder that was there (core/lock.py); a new folder may not
    tree = lambda: sorted(p for p in place.rglob("*") if not p.name.endswith(".lock"))   # noqa: E731
    before = tree()
    assert run_main(module, argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
    assert not (place / "cache").exists(), "rendered a dataset before refusing"
    assert not (place / "runs").exists() and not (place / "exports").exists(), "wrote before refusing"
    assert tree() == before, "left a file or folder behind"


def test_the_python_api_resumes_a_run_through_its_saved_config(place):
    from core.config import ConfigError
    from distill import train_recipe
    from distill.recipes import get_recipe

    with pytest.raises(ConfigError, match="resume=a-v3-run is a v3 run, not v4"):
        train_recipe(get_recipe("v4"), overrides=["resume=a-v3-run"])


@pytest.mark.parametrize("flag", ["--debug", "env"])
def test_debug_shows_the_traceback(flag, place):
    env = {"DENSEKIT_DEBUG": "1"} if flag == "env" else {}
    argv = ["--target", "tflite", "--check", "0"] + (["--debug"] if flag == "--debug" else [])
    proc = subprocess.run([sys.executable, "-m", "quant.export", *argv], cwd=place, capture_output=True, text=True,
                          env={**__import__("os").environ, "PYTHONPATH": str(ROOT), **env}, timeout=120)
    assert proc.returncode == 1 and "Traceback (most recent call last)" in proc.stderr
    assert "--check 0: must be at least 1" in proc.stderr


def test_debug_shows_the_traceback_of_a_command_that_reports_its_own_errors(place):
    """distill.cache_teacher prints its errors itself (rank 0 only under torchrun): --debug too."""
    proc = subprocess.run([sys.executable, "-m", "distill.cache_teacher", "v3", "--debug", "not-a-key-value"],
                          cwd=place, capture_output=True, text=True,
                          env={**__import__("os").environ, "PYTHONPATH": str(ROOT)}, timeout=120)
    assert proc.returncode == 1 and "Traceback (most recent call last)" in proc.stderr
    assert '"not-a-key-value" is not key=value' in proc.stderr
    from core.config import ConfigError
    from distill.cache_teacher import main   # from Python too: --debug reaches it through @command

    with pytest.raises(ConfigError, match="is not key=value"):
        main(["v3", "--debug", "not-a-key-value"])
    assert main(["v3", "not-a-key-value"]) == 2


def test_the_real_command_line_prints_one_line(place):
    proc = subprocess.run([sys.executable, "-m", "edge.bench", "missing.tflite"], cwd=place, capture_output=True,
                          text=True, env={**__import__("os").environ, "PYTHONPATH": str(ROOT)}, timeout=120)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        "error: cannot run missing.tflite: it does not exist (artefacts have the suffixes .tflite, .mlpackage, "
        ".onnx; python -m quant.export writes them under exports/)"]


def test_a_full_disk_during_training_is_named_with_exit_2(tmp_path):
    """out_dir on a 1 MiB tmpfs, in a private mount namespace: the first weights do not fit."""
    script = (f"mount -t tmpfs -o size=1m tmpfs {tmp_path / 'full'} && cd {ROOT} && "
              f"{sys.executable} -m distill.run v3 model.student=mobilenetv3_small_050 model.decoder_channels=16 "
              f"data.height=32 data.width=32 data.num_train=8 data.num_val=2 train.batch_size=8 train.epochs=1 "
              f"out_dir={tmp_path / 'full'} --quiet")
    (tmp_path / "full").mkdir()
    # root: a mount namespace; anyone else: a user namespace too (-r), where the mount is allowed
    for unshare in (["unshare", "-m"], ["unshare", "-rm"]):
        probe = subprocess.run([*unshare, "sh", "-c", f"mount -t tmpfs -o size=1m tmpfs {tmp_path / 'full'}"],
                               capture_output=True)
        if probe.returncode == 0:
            break
    else:
        pytest.skip(f"no private tmpfs mount here: {probe.stderr.decode().strip()}")
    proc = subprocess.run([*unshare, "sh", "-c", script], capture_output=True, text=True, timeout=300,
                          env={**__import__("os").environ, "DENSEKIT_CACHE": str(tmp_path / "cache")})
    err = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert err[-1].startswith("error: ") and "no space left on the device" in err[-1], err[-3:]


def test_a_converter_without_its_toolchain_fails_in_one_line(tmp_path, monkeypatch):
    """A converter process whose toolchain cannot be imported ends with the same one-line
    "<format> conversion failed" the parent shows for any other failure."""
    from targets.job import Job, main

    job = Job(format="tflite", precisions=["fp32"], sources={"float": str(tmp_path / "float.onnx")},
              out_dir=str(tmp_path / "out"), work_dir=str(tmp_path), stem="s", input_shape=[1, 3, 64, 96])
    job.save(tmp_path / "job.json")
    monkeypatch.setattr(sys, "argv", ["targets.tflite", str(tmp_path / "job.json")])
    converted = []
    with pytest.raises(SystemExit) as exit_:
        main(converted.append, toolchain=("densekit_no_such_toolchain",))
    assert str(exit_.value) == ("tflite conversion failed: ModuleNotFoundError: "
                                "No module named 'densekit_no_such_toolchain'")
    assert converted == [] and not (tmp_path / "out").exists()


A_JOB = {"precisions": ["fp32"], "sources": {"float": "f.onnx"}, "out_dir": "o", "work_dir": "w", "stem": "s",
         "input_shape": [1, 3, 64, 96]}


@pytest.mark.parametrize("content, says", [
    (None, "(FileNotFoundError: "), ("{not json", "(JSONDecodeError: "),
    ('{"format": "onnx"}', "(TypeError: Job.__init__() missing 6 required positional arguments"),
    (json.dumps({**A_JOB, "format": "onnx", "precisions": ["w8"]}), "onnx precisions must be a non-empty subset"),
    (json.dumps({**A_JOB, "format": "tensorrt"}), "format 'tensorrt' is not one of tflite, coreml, onnx"),
], ids=["missing", "not-json", "not-a-job", "unknown-precision", "unknown-format"])
def test_a_converter_given_a_bad_job_file_says_so_in_one_line(tmp_path, content, says):
    path = tmp_path / "job.json"
    if content is not None:
        path.write_text(content)
    proc = subprocess.run([sys.executable, "-m", "targets.onnx", str(path)], cwd=ROOT, capture_output=True, text=True)
    err = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert err[-1].startswith(f"error: cannot read the job file {path}") and says in err[-1], err[-3:]
    assert "usage: python -m targets.onnx JOB.json" in err[-1], err[-3:]


@pytest.mark.parametrize("job, says", [
    ({"format": "tflite", "precisions": ["fp32", "int8"]}, 'lacks sources["int8"] (the model file)'),
    ({"format": "onnx", "precisions": ["int8"], "sources": {"int8": "i.onnx"}},
     'calibration images are needed for int8 (int8 and w8a8 measure activation ranges on them, the palettes '
     'their bias correction): the onnx job needs calibration["nchw"]'),
    ({"format": "tflite", "precisions": ["fp32"], "metadata": {"input_layout": "NCHW"}},
     "input_layout 'NCHW': the default TFLite converter writes NHWC"),
    ({"format": "tflite", "precisions": ["fp32"], "converter": "tf2onnx"}, "TFLite has no converter 'tf2onnx'"),
    ({"format": "onnx", "check": None}, "check must be an object, got None"),   # was an AttributeError, exit 1
], ids=["source", "calibration", "layout", "converter", "null"])
def test_a_job_that_lacks_what_its_precisions_read_is_refused_before_converting(tmp_path, job, says):
    """Checked when the job file is read, not as a KeyError after a whole conversion (onnx2tf's
    calibration is read once the TensorFlow model exists)."""
    from targets.job import Job

    (tmp_path / "job.json").write_text(json.dumps({**A_JOB, **job}))
    with pytest.raises(ValueError, match=re.escape(says)):
        Job.load(tmp_path / "job.json")


def test_a_job_with_relative_paths_is_read_with_absolute_ones(tmp_path, monkeypatch):
    """targets.tflite changes directory to its work directory: a relative path would then miss."""
    from targets.job import Job

    monkeypatch.chdir(tmp_path)
    Path("job.json").write_text(json.dumps({**A_JOB, "format": "onnx", "check": {"inputs": "w/inputs.npy"}}))
    job = Job.load("job.json")
    assert job.work_dir == str(tmp_path / "w") and job.check["inputs"] == str(tmp_path / "w" / "inputs.npy")
    assert job.sources["float"] == str(tmp_path / "f.onnx") and job.out_dir == str(tmp_path / "o")


def test_a_reader_that_goes_away_stops_a_command_quietly():
    """`python -m quant.compression ... | head`: no 'error: BrokenPipeError' line, the shell's 141."""
    code = ("import sys\nfrom core.cli import command\n@command('python -m tabler')\ndef main(argv):\n"
            "    for row in range(200000):\n        print(f'| row {row} |')\n    return 0\nsys.exit(main([]))\n")
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout.readline() == b"| row 0 |\n"
    proc.stdout.close()   # what head does after its lines
    assert proc.wait(timeout=60) == 141 and proc.stderr.read() == b""


def test_a_tilde_the_shell_left_in_a_path_means_home(tmp_path, monkeypatch):
    """A shell expands "~" only where a word starts with it or in an assignment (out_dir=~/runs):
    data.dataset=folder:~/pics, teacher.cache=~/c and --run=~/r reach the program as typed, and were
    refused as paths that do not exist."""
    from distill.data import check_sources
    from distill.recipes.base import DataConfig
    from distill.teachers.cache import CachedTeacher
    from distill.training.runs import find_run

    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "pics").mkdir()
    check_sources(DataConfig(dataset="folder:~/pics", val_dataset="synthrooms"))
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "job.json").write_text("{}")   # a cache whose caching run stopped: found, so named as such
    with pytest.raises(FileNotFoundError, match="teacher.cache=.*/c is incomplete"):
        CachedTeacher.open("~/c")
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "config.json").write_text(json.dumps({"name": "v3"}))
    assert find_run("~/r") == tmp_path / "r"
    with pytest.raises(FileNotFoundError, match=f"no finished v3 run under {tmp_path}/nothing;"):   # not ./~/nothing
        find_run(None, "~/nothing")
    # flags given as --flag=~/x: the outputs made a folder named "~" in the working directory
    from edge.run import parse_args as run_args
    from quant.export import parse_args as export_args

    assert export_args(["--target", "tflite", "--out=~/exports", "--run=~/r"]).out == str(tmp_path / "exports")
    edge = run_args(["m.tflite", "--inputs=~/pics", "--out=~/maps"])
    assert (edge.inputs, edge.out) == ([str(tmp_path / "pics")], str(tmp_path / "maps"))
    from quant.compression import parse_args as compression_args

    assert compression_args(["~/exports/v3-x"]).run_exports == str(tmp_path / "exports" / "v3-x")   # quoted
    from core.io import IntegrityError
    from quant import verify
    with pytest.raises(IntegrityError, match=f"{tmp_path}/exports/v3-x is not a directory"):   # quoted: not "~/..."
        verify.main.__wrapped__(["~/exports/v3-x"])


class DamagedImages:
    """A dataset whose second sample is a file cut short, as folder datasets report it."""

    def __len__(self) -> int:
        return 2

    def __getitem__(self, index: int):
        if index == 1:
            raise ValueError("/data/pics/b.jpg cannot be read (OSError: image file is truncated):\nfix or remove it")
        return index


def test_a_dataloader_workers_error_is_its_own_one_line_message():
    """torch re-raises a worker's exception with the worker's traceback as the message: the command's
    one error line was a kilobyte of traceback (data.workers > 0, usual on a GPU)."""
    from torch.utils.data import DataLoader

    from core.cli import describe, exit_code

    with pytest.raises(ValueError) as caught:
        list(DataLoader(DamagedImages(), batch_size=None, num_workers=1))
    assert "Original Traceback" in str(caught.value)
    assert describe(caught.value, "distill.run") == ("/data/pics/b.jpg cannot be read (OSError: image file is truncated): "
                                                     "fix or remove it")
    assert exit_code(caught.value) == 2
