"""An export's manifest.json, read back: every artefact is checked against the sha256 recorded
when it was exported, wherever it is used (edge.run, edge.bench, python -m quant.verify).

Torch-free: the runtime processes check an artefact before they open it.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Iterable

from core.formats import SUFFIXES
from core.io import IntegrityError, check_sha256, home_path, matches_record

MANIFEST = "manifest.json"
SHA256 = re.compile(r"[0-9a-f]{64}")
__all__ = ["MANIFEST", "IntegrityError", "read_manifest", "verify_artefact", "verify_export"]


def read_manifest(export_dir: str | Path) -> dict:
    path = Path(export_dir) / MANIFEST
    try:
        manifest = json.loads(path.read_text())
        if not isinstance(manifest, dict) or not isinstance(manifest.get("artefacts"), list):
            raise ValueError("no list of artefacts")
        entries = manifest["artefacts"]   # the shape quant.export writes: every entry a path and a sha256
        if not entries or not all(isinstance(a["path"], str) and SHA256.fullmatch(a["sha256"]) for a in entries):
            raise ValueError("an artefact entry without a path or a 64-digit sha256")
        # a file of the export itself: "../x" would check, run and list a file outside it
        outside = [a["path"] for a in entries if a["path"] in ("", ".", "..") or Path(a["path"]).name != a["path"]]
        if outside:
            raise ValueError(f"the artefact path {outside[0]!r} is not a file name of the export")
        return manifest
    except (OSError, ValueError, KeyError, IndexError, TypeError) as exc:
        raise IntegrityError(f"{path} is missing or unreadable ({type(exc).__name__}: {exc}); it is written by "
                             f"python -m quant.export: re-export to get it back") from None


def verify_export(export_dir: str | Path) -> list[str]:
    """Every artefact of the manifest that is missing or whose sha256 differs, and every artefact-like
    file the manifest does not list (edge.run refuses those; empty: intact)."""
    found = []
    recorded = {a["path"]: a["sha256"] for a in read_manifest(export_dir)["artefacts"]}
    for name, sha in recorded.items():
        path = Path(export_dir) / name
        if not path.exists():
            found.append(f"{name}: missing")
        elif not matches_record(path, sha):
            found.append(f"{name}: sha256 differs from the manifest")
    for path in sorted(Path(export_dir).iterdir()):   # what edge.run would be handed besides them
        if path.suffix.lower() not in SUFFIXES or path.name in recorded:
            continue
        twin = listed_name(path.name, recorded)   # another case of a listed name: checked against its record
        if twin is None:
            found.append(f"{path.name}: not in the manifest (nothing recorded vouches for it)")
        elif not matches_record(path, recorded[twin]):
            found.append(f"{path.name}: sha256 differs from the manifest's {twin}")
    return found


def listed_name(name: str, recorded: dict[str, str]) -> str | None:
    """The manifest entry that `name` is: itself, or a listed name in another case (MODEL.TFLITE opens
    model.tflite on macOS and Windows); None when the manifest does not list it."""
    if name in recorded:
        return name
    return next((listed for listed in recorded if listed.casefold() == name.casefold()), None)


def verify_artefact(path: str | Path, skip: str = "verify=False") -> bool:
    """Check `path` against the manifest.json beside it; True when it was checked, False when it sits
    outside an export directory (nothing recorded). IntegrityError when it differs, or when the
    manifest does not list it (an unlisted file in an export directory would otherwise run unchecked).
    `skip`: how the caller's user turns the check off, for the message (the API's keyword, or a flag)."""
    path = Path(path)
    if not (path.parent / MANIFEST).is_file():
        return False
    recorded = {a["path"]: a["sha256"] for a in read_manifest(path.parent)["artefacts"]}
    name = listed_name(path.name, recorded)
    if name is None:
        raise IntegrityError(f"{path} is not listed in {path.parent / MANIFEST}, so nothing recorded vouches for it: "
                             f"run the export's own files ({', '.join(sorted(recorded))}), move it out of "
                             f"{path.parent}, or pass {skip} to run it anyway")
    check_sha256(path, recorded[name], record=f"recorded in {path.parent / MANIFEST}",
                 fix="it changed after export (corrupted or edited). Re-export it (python -m quant.export ... "
                     f"--overwrite), or pass {skip} to run it anyway")
    return True


def files_read(artefacts: Iterable[str | Path]) -> list[Path]:
    """What a command that runs `artefacts` reads: each of them and the manifest.json beside it (its
    result file must be none of them: core.io.check_output_file)."""
    return [path for artefact in artefacts for path in (home_path(artefact), home_path(artefact).parent / MANIFEST)]


def verify_command_arguments(paths: Iterable[str | Path]) -> None:
    """`verify_artefact` for a command's artefact arguments, before it calls its Python API with
    verify=False, so that a refusal names the command's flag (--no-verify) rather than the API's
    keyword. A path that does not exist, or is no artefact by its suffix, is left to the API's own
    check, which names what is wrong with it."""
    for path in paths:
        if Path(path).exists() and Path(path).suffix.lower() in SUFFIXES:
            verify_artefact(path, skip="--no-verify")
