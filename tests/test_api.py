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
