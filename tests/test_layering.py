"""The import rules of docs/DESIGN.md, read from the code itself so that the layering cannot rot.

Every import of the project's own modules (top-level, inside functions, relative) is an arrow from
one layer to another; an arrow that the table below does not allow fails with the file, the line
and the rule. The torch-free modules are imported in a fresh interpreter and must leave torch out.
"""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("core", "distill", "quant", "targets", "calibration", "edge")
DOMAIN = ("distill.data", "distill.teachers", "distill.students", "distill.losses", "distill.metrics",
          "distill.recipes")
COMMANDS = ("distill.run", "distill.evaluate", "distill.ablate", "distill.cache_teacher", "distill")   # distill/__init__: the API

# layer -> the layers it may import (itself included where listed)
ALLOWED = {
    "core": {"core"},
    "domain": {"core", "domain"},
    "training": {"core", "domain", "training"},
    "commands": {"core", "domain", "training", "commands"},
    "calibration": {"core", "domain", "calibration"},
    "edge": {"core", "domain", "edge"},
    "targets": {"core", "domain", "edge", "targets"},
    "quant": {"core", "domain", "training", "calibration", "edge", "targets", "quant"},
}
TORCH_FREE = ("core.io", "core.graph", "core.contract", "core.formats", "core.manifest", "core.lock", "core.registry", "core.config", "core.spaces",
              "core.lazy", "edge", "edge.run", "edge.runners", "edge.bench", "edge.kit", "targets.job", "targets.tflite_file",
              "targets.profiles", "quant", "distill", "calibration")


def layer_of(module: str) -> str:
    if module == "core" or module.startswith("core."):
        return "core"
    if any(module == d or module.startswith(d + ".") for d in DOMAIN):
        return "domain"
    if module == "distill.training" or module.startswith("distill.training."):
        return "training"
    if module in COMMANDS:
        return "commands"
    return module.split(".")[0]


def module_name(path: Path, root: Path = ROOT) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_imports(path: Path, root: Path = ROOT) -> list[tuple[int, str]]:
    """(line, imported module) for every import of the project's own modules in `path`."""
    name = module_name(path, root)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            # `from pkg import sub` imports the submodule pkg.sub when there is one
            folder = root / base.replace(".", "/")
            names = [f"{base}.{a.name}" if (folder / a.name).exists() or (folder / f"{a.name}.py").exists()
                     else base for a in node.names]
        else:
            continue
        found += [(node.lineno, n) for n in names if n.split(".")[0] in PACKAGES]
    return found


def sources(root: Path = ROOT) -> list[Path]:
    """The project's modules; edge/device/ holds scripts copied to devices, which import nothing of ours."""
    return sorted(p for pkg in PACKAGES for p in (root / pkg).rglob("*.py")
                  if "device" not in p.relative_to(root).parts)


def forbidden_imports(root: Path = ROOT) -> list[str]:
    broken = []
    for path in sources(root):
        src = layer_of(module_name(path, root))
        for line, target in project_imports(path, root):
            dst = layer_of(target)
            if dst not in ALLOWED[src]:
                broken.append(f"{path.relative_to(root)}:{line}: {src} -> {dst} ({target}); "
                              f"{src} may import {sorted(ALLOWED[src])}")
    return broken


def test_every_import_follows_the_layer_rules():
    broken = forbidden_imports()
    assert not broken, "forbidden imports (docs/DESIGN.md, layers):\n" + "\n".join(broken)


def test_only_the_training_stage_imports_the_loop():
    outside = [f"{p.relative_to(ROOT)}:{line}" for p in sources() if layer_of(module_name(p)) != "training"
               for line, target in project_imports(p) if target == "distill.training.loop"]
    assert not outside, f"import distill.training (its face), not the loop module: {outside}"


def test_quant_reaches_the_training_stage_only_through_its_face():
    inside = [f"{p.relative_to(ROOT)}:{line} {target}" for p in sources() if layer_of(module_name(p)) == "quant"
              for line, target in project_imports(p) if target.startswith("distill.training.")]
    assert not inside, f"quant/ imports distill.training (its face), not its modules: {inside}"


def test_edge_never_imports_targets():
    """targets/ (converters) check parity with edge's runners; edge importing targets is the old circle."""
    arrows = [f"{p.relative_to(ROOT)}:{line}: {t}" for p in (ROOT / "edge").rglob("*.py")
              for line, t in project_imports(p) if t.startswith("targets")]
    assert not arrows, arrows


@pytest.mark.parametrize("name", ["DEPTH", "SEG", "INPUT_NAME", "OUTPUT_NAMES", "FORMATS", "SUFFIXES",
                                  "IMAGENET_MEAN", "IMAGENET_STD"])
def test_each_contract_name_is_defined_once(name):
    defined = []
    for path in sources():
        for node in ast.parse(path.read_text()).body:
            targets = [t for n in ([node] if isinstance(node, (ast.Assign, ast.AnnAssign)) else [])
                       for t in (n.targets if isinstance(n, ast.Assign) else [n.target])]
            names = [e.id for t in targets for e in ([t] + list(getattr(t, "elts", []))) if isinstance(e, ast.Name)]
            if name in names:
                defined.append(str(path.relative_to(ROOT)))
    assert len(defined) == 1, f"{name} is defined in {defined}; define it once (core/contract.py, core/formats.py)"


def test_no_second_format_table():
    """A literal naming every format outside core/formats.py is a second table in the making."""
    names = {"tflite", "coreml", "onnx"}
    tables = []
    for path in sources():
        if path == ROOT / "core" / "formats.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.Tuple, ast.List, ast.Set, ast.Dict)):
                items = node.keys if isinstance(node, ast.Dict) else node.elts
                strings = {i.value for i in items if isinstance(i, ast.Constant) and isinstance(i.value, str)}
                if names <= strings:
                    tables.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert not tables, f"format names listed outside core/formats.py: {tables}"


def test_torch_free_modules_do_not_import_torch():
    code = ("import sys\n" + "".join(f"import {m}\n" for m in TORCH_FREE)
            + "print(sorted(m for m in ('torch', 'tensorflow') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", f"{TORCH_FREE} pulled in {out.stdout.strip()}"


def test_the_checker_sees_forbidden_arrows(tmp_path):
    """The checker itself, on a small tree: absolute, relative and from-package imports are seen."""
    for folder in ("core", "edge", "targets", "distill/training"):
        (tmp_path / folder).mkdir(parents=True)
    (tmp_path / "distill" / "training" / "loop.py").write_text("")
    (tmp_path / "targets" / "job.py").write_text("")
    (tmp_path / "edge" / "runner.py").write_text("from distill.training import loop\n")
    (tmp_path / "edge" / "probe.py").write_text("def f():\n    import targets.job\n")
    (tmp_path / "core" / "io.py").write_text("from ..edge import runner\n")
    assert sorted(line.split(":")[0] + ": " + line.split(": ")[1] for line in forbidden_imports(tmp_path)) == [
        "core/io.py: core -> edge (edge.runner); core may import ['core']",
        "edge/probe.py: edge -> targets (targets.job); edge may import ['core', 'domain', 'edge']",
        "edge/runner.py: edge -> training (distill.training.loop); edge may import ['core', 'domain', 'edge']",
    ]
