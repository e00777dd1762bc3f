"""A pytest plugin: coremltools' own MIL op tests, with edge/mil.py standing in for Core ML prediction.

coremltools ships its op tests in the wheel (`coremltools/converters/mil/mil/ops/tests/iOS14..iOS18`),
with the expected outputs inline. Off macOS they stop before predicting. Loaded with `-p
coreml_optests` (tests/ on sys.path), this plugin makes them predict: `MLModel.predict` runs the
saved package on the reference executor (`edge.mil.MILProgram`), and coremltools' own
`compare_backend` then checks the outputs at the test's own tolerances (for fp16 programs,
coremltools itself widens them to atol max(100 atol, 0.5), rtol max(100 rtol, 0.05)). Nothing is
loosened here.

Each test is classified (`OUTCOMES`) by what the executor did, and per op family (the test class,
e.g. TestConvTranspose -> ConvTranspose) the counts are written as JSON to the path in
$DENSEKIT_OPTESTS_REPORT (tests/test_mil_optests.py reads it), with the failures and the op types
of the programs that passed:
- passed: predicted on the executor and the test passed;
- failed: predicted and the test's comparison failed;
- error: the executor raised something other than UnsupportedOpError (a bug);
- unsupported: the executor refused an op or a form (UnsupportedOpError);
- not_executed: the test ended (passed or failed) without predicting (type inference, builder
  errors, macOS-only paths);
- skipped: the test skipped itself (e.g. an opset it does not apply to);
- xfailed: coremltools marks the case as an expected failure.

On macOS, every prediction also runs on Core ML itself (coremltools' MLModel.predict), and the
report's "parity_with_core_ml" gives per family the largest |executor - Core ML| / (1 + |Core ML|):
the executor-vs-Core ML comparison of edge.coreml.CoreMLRunner.compare_executors, for every op the
op tests build. (Not run here: no Mac.)

Run the whole set (about an hour on 2 cores):
    PYTHONPATH=tests DENSEKIT_OPTESTS_REPORT=/tmp/optests.json python -m pytest -p coreml_optests \
        -p no:cacheprovider -o addopts= -q --pyargs coremltools.converters.mil.mil.ops.tests
"""
from __future__ import annotations

import gc
import json
import os
import sys
import types
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest

# TensorFlow and torch in one process segfault (docs/TOOLCHAIN.md); the op tests need neither TF
# nor its converters, so TF is hidden before anything imports coremltools.
sys.modules.setdefault("tensorflow", None)

OUTCOMES = ("passed", "failed", "error", "unsupported", "not_executed", "skipped", "xfailed")
_state = {"predicted": 0, "executor_error": None, "unsupported": None, "ops": set()}
_ops_passed: set[str] = set()   # op types of the programs of passed tests
_counts: dict[str, dict[str, int]] = defaultdict(lambda: dict.fromkeys(OUTCOMES, 0))
_failures: dict[str, list[str]] = defaultdict(list)


def _feeds(program, data: dict) -> dict[str, np.ndarray]:
    """The caller's inputs in the program's shapes: coremltools' test helper sends scalars as (1,)."""
    feeds = {}
    for name, kind in program.inputs.items():
        value = np.asarray(data[name])
        if kind.shape == () and value.shape == (1,):
            value = value.reshape(())
        feeds[name] = value
    return feeds


_core_ml_predict = None   # on macOS: coremltools' own MLModel.predict, for the parity record
_parity: dict[str, float] = defaultdict(float)   # family -> largest |executor - Core ML| / (1 + |Core ML|)


def _predict(self, data, state=None, **_):
    from edge.mil import MILProgram, UnsupportedOpError
    _state["predicted"] += 1
    try:
        if state is not None:
            raise UnsupportedOpError("stateful models (iOS18 states) are not supported")
        if getattr(self, "package_path", None) is None:
            pytest.skip("a neural network model: the reference executor runs ML programs")
        program = MILProgram(self.package_path)
        _state["ops"] |= set(program.ops_used)
        ours = program(_feeds(program, data), keep_dtypes=True)
        if _core_ml_predict is not None:
            _record_parity(ours, _core_ml_predict(self, dict(data)))
        return ours
    except UnsupportedOpError as e:
        _state["unsupported"] = str(e)
        raise
    except Exception as e:
        _state["executor_error"] = f"{type(e).__name__}: {e}"
        raise


def _record_parity(ours: dict, core_ml: dict) -> None:
    """On macOS: how far the executor's outputs are from Core ML's own on the same package."""
    for name, value in ours.items():
        if name in core_ml and np.asarray(value).dtype.kind in "fiub":
            theirs = np.asarray(core_ml[name], np.float64)
            gap = np.abs(np.asarray(value, np.float64) - theirs) / (1 + np.abs(theirs))
            _state["parity"] = max(_state.get("parity", 0.0), float(gap.max(initial=0.0)))


def pytest_configure(config) -> None:
    global _core_ml_predict
    import coremltools as ct
    from coremltools.converters.mil import testing_utils
    from coremltools.models import utils as ct_utils

    if ct_utils._is_macos():   # the tests check the executor; Core ML's own outputs are kept for parity
        _core_ml_predict = ct.models.MLModel.predict
    # compare_backend predicts only when it believes it runs on macOS 12 or newer
    testing_utils._IS_MACOS = True
    testing_utils.coremltoolsutils = types.SimpleNamespace(**{**vars(ct_utils), "_macos_version": lambda: (15, 0)})
    ct.models.MLModel.predict = _predict


def pytest_collection_modifyitems(config, items) -> None:
    """$DENSEKIT_OPTESTS_SELECT (JSON {module suffix: [selectors]}) keeps the cases of those modules
    whose test id matches any selector: a substring, or a list of substrings that must all occur
    (an empty list keeps the whole module)."""
    select = json.loads(os.environ.get("DENSEKIT_OPTESTS_SELECT", "null"))
    if select is None:
        return
    kept, dropped = [], []
    for item in items:
        module = item.module.__name__.removeprefix("coremltools.converters.mil.mil.ops.tests.")
        words = select.get(module)
        name = item.nodeid.split("::", 1)[-1]
        keep = words is not None and (not words or any(
            all(part in name for part in ([w] if isinstance(w, str) else w)) for w in words))
        (kept if keep else dropped).append(item)
    items[:] = kept
    config.hook.pytest_deselected(items=dropped)


def pytest_collection_finish(session) -> None:
    # coremltools' convert ends with a full gc.collect(), which walks every object torch and
    # coremltools have loaded: 0.4 s of each test's 0.5 s here. Frozen objects are not walked.
    gc.freeze()


def _family(item) -> str:
    cls = getattr(item, "cls", None)
    name = cls.__name__ if cls is not None else item.name.split("[")[0]
    return name.removeprefix("Test") or name


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item) -> None:
    _state.update(predicted=0, executor_error=None, unsupported=None, ops=set(), parity=0.0)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.when != "call" and not (report.when == "setup" and report.skipped):
        return
    if hasattr(report, "wasxfail"):
        kind = "xfailed"
    elif report.skipped:
        kind = "skipped"
    elif _state["unsupported"]:
        kind = "unsupported"
    elif _state["executor_error"]:
        kind = "error"
    elif not _state["predicted"]:
        kind = "not_executed"
    else:
        kind = "passed" if report.passed else "failed"
    family = _family(item)
    _counts[family][kind] += 1
    if kind == "passed":
        _ops_passed.update(_state["ops"])
    _parity[family] = max(_parity[family], _state.get("parity", 0.0))
    if kind in ("failed", "error", "unsupported"):
        reason = _state["unsupported"] or _state["executor_error"] or str(report.longrepr).strip().splitlines()[-1]
        _failures[family].append(f"{kind}: {item.module.__name__.split('.')[-2]}{item.nodeid}: {reason[:300]}")


def pytest_sessionfinish(session) -> None:
    path = os.environ.get("DENSEKIT_OPTESTS_REPORT")
    if not path:
        return
    report = {"counts": dict(sorted(_counts.items())), "failures": dict(sorted(_failures.items())),
              "ops_passed": sorted(_ops_passed)}
    if _core_ml_predict is not None:   # macOS only
        report["parity_with_core_ml"] = dict(sorted(_parity.items()))
    Path(path).write_text(json.dumps(report, indent=1))
