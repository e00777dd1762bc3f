"""coremltools' own MIL op tests as the reference executor's test suite (plugin: tests/coreml_optests.py).

The tests ship in the coremltools wheel with their expected outputs inline; the plugin makes them
predict on edge/mil.py and compares at the tests' own tolerances. They run in a child pytest
(TensorFlow hidden there, as everywhere torch and coremltools meet), which writes a per-family
report that these tests check:
- `test_vision_subset` (CI, about 30 s): one or a few cases of every op family the executor
  implements for vision models, from the iOS15 to the iOS18 opsets, the iOS18 compression ops
  included. Every executed case passes, none is refused, and every handler in edge/mil_ops/ is
  exercised by a passing case (here or by tests/test_mil.py's torch-reference cases).
- `test_whole_set` (marked `optests`, not in the default run: over an hour on 2 cores):
  `python -m pytest -m optests tests/test_mil_optests.py`. At least 99% of the executed cases
  pass, and the per-family table is printed (README, "The Core ML reference executor").
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
OPTESTS = "coremltools.converters.mil.mil.ops.tests"

# The CI subset, ~240 cases: module under OPTESTS -> selectors of the test ids to keep (any of them:
# a substring, or a list of substrings that must all occur; [] keeps the module). Chosen so that
# each handler runs in at least one passing case.
SUBSET = {
    "iOS14.test_activation": ["smoke", "TestPReLU::test_builder_to_backend_stress"],
    "iOS14.test_conv": ["TestConvTranspose::"],
    "iOS14.test_normalization": ["smoke"],
    "iOS17.test_normalization": ["TestNormalizationL2Norm::test_builder_to_backend_smoke"],
    "iOS14.test_linear": ["smoke"],
    "iOS14.test_reduction": ["smoke"],
    "iOS14.test_pool": ["smoke"],
    "iOS14.test_elementwise_unary": ["smoke"],
    "iOS15.test_elementwise_unary": [],
    "iOS14.test_elementwise_binary": ["smoke"],
    "iOS14.test_image_resizing": ["TestUpsampleNearestNeighbor::", "TestResizeNearestNeighbor::", "TestCrop::"],
    "iOS15.test_image_resizing": ["Nearest"],
    "iOS17.test_image_resizing": ["TestResize::"],
    "iOS14.test_tensor_transformation": ["smoke"],
    "iOS16.test_tensor_transformation": [
        "TestPixelUnshuffle",
        ["TestReshapeLike::test_builder_to_backend_smoke", "=[(4, 3), ",
         "x_dtype=<class 'numpy.float16'>-ref_dtype=<class 'numpy.float16'>"]],
    "iOS17.test_tensor_transformation": ["zero"],
    "iOS14.test_tensor_operation": [
        "TestFill::test_builder_to_backend_smoke", "TestFlatten2d::test_builder_to_backend_smoke", "TestShape::",
        "TestRange1d::test_builder_to_backend_smoke", "TestConcat", "TestSplit", "TestStack", "TestTile::",
        "TestPad::test_builder_to_backend_smoke"],
    "iOS16.test_tensor_operation": ["TestFillLike"],
    "iOS14.test_scatter_gather": ["TestGather::test_builder_to_backend_smoke",
                                  "TestGatherAlongAxis::test_builder_to_backend_smoke"],
    "iOS16.test_constexpr_ops": ["smoke"],
    "iOS18.test_compression": ["smoke", ["TestConstexprBlockwiseDequantize::test_builder_to_backend_stress", "iOS18",
                                         "dtype=int4"]],
    "iOS17.test_quantization": ["smoke"],
    "iOS18.test_transformers": [["TestScaledDotProductAttention::test_builder_to_backend_stress", "batches=[3]-",
                                 "float_dtype=<class 'numpy.float16'>"]],
}


def run_optests(targets: list[str], report: Path, timeout: int, select: dict | None = None) -> dict:
    """Run coremltools' op tests `targets` (--pyargs module paths; `select`: see SUBSET) on the
    executor in a child pytest; returns the plugin's report."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "tests"), str(ROOT)]),
           "PYMIL_TEST_TARGETS": "mlprogram", "DENSEKIT_OPTESTS_REPORT": str(report)}
    if select is not None:
        env["DENSEKIT_OPTESTS_SELECT"] = json.dumps(select)
    command = [sys.executable, "-m", "pytest", "-p", "coreml_optests", "-p", "no:cacheprovider",
               "-p", "no:warnings", "-o", "addopts=", "-q", "--rootdir", str(report.parent),
               "--pyargs", *targets]
    done = subprocess.run(command, cwd=report.parent, env=env, capture_output=True, text=True, timeout=timeout)
    if not report.is_file():
        raise AssertionError(f"the op tests wrote no report (exit {done.returncode}):\n{done.stdout[-3000:]}"
                             f"\n{done.stderr[-3000:]}")
    return json.loads(report.read_text())


def totals(report: dict) -> dict[str, int]:
    summed: dict[str, int] = {}
    for counts in report["counts"].values():
        for kind, n in counts.items():
            summed[kind] = summed.get(kind, 0) + n
    return summed


def family_table(report: dict) -> str:
    kinds = ("passed", "failed", "error", "unsupported", "not_executed", "skipped", "xfailed")
    rows = ["| family | " + " | ".join(kinds) + " |", "|---" * (len(kinds) + 1) + "|"]
    rows += [f"| {family} | " + " | ".join(str(counts.get(k, 0)) for k in kinds) + " |"
             for family, counts in report["counts"].items()]
    return "\n".join(rows)


@pytest.fixture(scope="module")
def subset_report(tmp_path_factory) -> dict:
    report = tmp_path_factory.mktemp("optests") / "report.json"
    return run_optests([f"{OPTESTS}.{module}" for module in SUBSET], report, timeout=900, select=SUBSET)


def test_vision_subset(subset_report):
    summed = totals(subset_report)
    problems = [line for lines in subset_report["failures"].values() for line in lines]
    assert not problems, "\n".join(problems[:20])
    assert summed.get("passed", 0) >= 150, (summed, family_table(subset_report))


def test_every_handler_is_exercised(subset_report):
    """Each handler ran in a passing op test, or has a case of its own in tests/test_mil.py."""
    from test_mil import CASES, DIRECT_OPS, SPLIT_CASES

    from edge.mil_ops import HANDLERS
    covered = {c.split("/")[0] for c in [*CASES, *SPLIT_CASES]} | set(DIRECT_OPS) | set(subset_report["ops_passed"])
    missing = sorted(set(HANDLERS) - covered)
    assert not missing, f"handlers no test runs: {missing}"


@pytest.mark.optests
def test_whole_set(tmp_path):
    report = run_optests([OPTESTS], tmp_path / "report.json", timeout=4 * 3600)
    summed = totals(report)
    print(family_table(report))
    executed = summed.get("passed", 0) + summed.get("failed", 0) + summed.get("error", 0)
    assert summed.get("passed", 0) >= 0.99 * executed, summed
