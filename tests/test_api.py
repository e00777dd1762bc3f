"""The README's Python API example, run as written: the whole chain (train -> export with
conversion, execution and drift gates -> side-by-side bench) through the API alone, no argv."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def api_example() -> str:
    section = README.read_text().split("## Python API", 1)[1]
    match = re.search(r"```python\n(.*?)```", section, re.S)
    assert match, "README.md's Python API section has no python example"
    return match.group(1)


@pytest.mark.slow
def test_readme_python_api_example_runs(tmp_path, monkeypatch):
    monkeypatch.setenv("DENSEKIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)   # runs/ and exports/ land here, as for a user in a project folder
    scope: dict = {}
    exec(compile(api_example(), str(README), "exec"), scope)
    result, speed = scope["result"], scope["speed"]
    assert result.path.resolve() == (tmp_path / "exports" / scope["run"].name / "tflite").resolve()
    assert {r.precision for r in result.reports} == {"fp32", "int8"}
    assert (result.path / "manifest.json").is_file() and (result.path / "drift.json").is_file()
    assert [a["artefact"] for a in speed["artefacts"]] == [p.name for p in scope["files"]]
    assert speed["artefacts"][0]["speedup_vs_first"] == 1.0


def test_package_faces_load_on_first_use_and_refuse_unknown_names():
    import distill
    import edge
    import quant

    assert callable(distill.train_recipe) and callable(quant.export_run) and callable(edge.bench_side_by_side)
    with pytest.raises(AttributeError, match="has no attribute 'train'"):
        quant.train


def test_export_run_refuses_an_unknown_option_before_anything_runs(tmp_path):
    from quant import export_run

    with pytest.raises(ValueError, match=r"unknown export option\(s\) \['qat_step'\].*qat_steps"):
        export_run(tmp_path / "no-run", target="tflite", qat_step=0)


def test_export_run_takes_natural_python_values_and_names_a_wrong_type(tmp_path, monkeypatch):
    """The command's parser gives each option its type; from Python, a string where a tuple is meant
    was iterated letter by letter ("tflite cannot produce i, n, t, 8") and a tuple size raised
    AttributeError. Strings and tuples are now read as the command reads them, other types named."""
    from quant.export import ExportOptions, checked_options

    options = checked_options(ExportOptions(precisions="fp32,int8", float_ops="div, mean", input_size=(256, 320),
                                            prune_lr=1, qat_steps=None))
    assert (options.precisions, options.float_ops, options.input_size) == (("fp32", "int8"), ("DIV", "MEAN"), "256x320")
    assert options.prune_lr == 1.0 and isinstance(options.prune_lr, float)
    assert checked_options(ExportOptions(precisions=["int8"])).precisions == ("int8",)
    assert checked_options(ExportOptions(qat_steps=0)).qat_steps == 0   # None: the recipe's; or a number
    assert checked_options(ExportOptions(out=tmp_path / "exports", prune=0.3)).out == str(tmp_path / "exports")
    assert checked_options(ExportOptions(prune=0.3)).prune == "0.3"
    monkeypatch.setenv("HOME", str(tmp_path))
    assert checked_options(ExportOptions(out="~/exports")).out == str(tmp_path / "exports")   # not a folder "~"
    import numpy as np   # numpy's numbers, as a sweep yields them
    numpy_values = checked_options(ExportOptions(prune=np.float64(0.3), calib=np.int64(16), qat_lr=np.float32(1e-4)))
    assert (numpy_values.prune, numpy_values.calib) == ("0.3", 16) and type(numpy_values.calib) is int
    for values, message in (({"calib": "16"}, r"calib='16': expected int, like its default \d+"),
                            ({"equalize": 0}, r"equalize=0: expected bool"),
                            ({"check": True}, r"check=True: expected int"),
                            ({"qat_steps": "300"}, r"qat_steps='300': expected int"),
                            ({"input_size": (256,)}, r"input_size=\(256,\): expected \(height, width\)"),
                            ({"precisions": 8}, r"precisions=8: expected a tuple of names")):
        with pytest.raises(ValueError, match=message):
            checked_options(ExportOptions(**values))


def test_export_run_gives_back_the_callers_thread_count_even_when_it_fails(tmp_path):
    """export_run sets torch's threads to the plan's (2 by default) and left them so, a failure included:
    a notebook's later work ran on another thread count than it had chosen."""
    import torch

    from quant import export_run

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with pytest.raises(FileNotFoundError):
            export_run(tmp_path / "no-run", target="tflite", threads=2)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
