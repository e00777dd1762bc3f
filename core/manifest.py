"""An export's manifest.json, read back: every artefact is checked against the sha256 recorded
when it was exported, wherever it is used (edge.run, edge.bench, python -m quant.verify).

Torch-free: the runtime processes check an artefact before they open it.
"""
from __future__ import annotations

import json
from pathlib import Path

from core.io import IntegrityError, check_sha256, matches_record

MANIFEST = "manifest.json"
__all__ = ["MANIFEST", "IntegrityError", "read_manifest", "verify_artefact", "verify_export"]


def read_manifest(export_dir: str | Path) -> dict:
    path = Path(export_dir) / MANIFEST
    try:
        manifest = json.loads(path.read_text())
        manifest["artefacts"][0]["sha256"]   # the shape quant.export writes
        return manifest
    except (OSError, ValueError, KeyError, IndexError, TypeError) as exc:
        raise IntegrityError(f"{path} is missing or unreadable ({type(exc).__name__}: {exc}); it is written by "
                             f"python -m quant.export: re-export to get it back") from None


def verify_export(export_dir: str | Path) -> list[str]:
    """Every artefact of the manifest that is missing or whose sha256 differs (empty: intact)."""
    found = []
    for a in read_manifest(export_dir)["artefacts"]:
        path = Path(export_dir) / a["path"]
        if not path.exists():
            found.append(f"{a['path']}: missing")
        elif not matches_record(path, a["sha256"]):
            found.append(f"{a['path']}: sha256 differs from the manifest")
    return found


def verify_artefact(path: str | Path) -> bool:
    """Check `path` against the manifest.json beside it; True when it was checked, False when it sits
    outside an export directory (nothing recorded). IntegrityError when it differs."""
    path = Path(path)
    if not (path.parent / MANIFEST).is_file():
        return False
    recorded = {a["path"]: a["sha256"] for a in read_manifest(path.parent)["artefacts"]}
    if path.name not in recorded:
        return False
    check_sha256(path, recorded[path.name], record=f"recorded in {path.parent / MANIFEST}",
                 fix="it changed after export (corrupted or edited). Re-export it (python -m quant.export ... "
                     "--overwrite), or pass --no-verify to run it anyway")
    return True
