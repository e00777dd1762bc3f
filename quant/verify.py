"""`python -m quant.verify EXPORT_DIR` - check a whole export against its manifest.json.

    python -m quant.verify exports/v3-20261121T101500Z/tflite

Re-hashes every artefact the manifest lists (sha256, as recorded at export). Exit status: 0 every
artefact is present and intact; 2 the directory is not an export, or an artefact is missing or
differs (one `error:` line naming each one and the fix).
"""
from __future__ import annotations

import sys
from pathlib import Path

from core.cli import ArgumentParser, command, user_path
from core.formats import SUFFIXES
from core.manifest import MANIFEST, IntegrityError, read_manifest, verify_export


@command("python -m quant.verify")
def main(argv: list[str]) -> int:
    parser = ArgumentParser(prog="python -m quant.verify", description=__doc__.split("\n\n")[0])
    parser.add_argument("export_dir", type=user_path, help="an export directory: exports/<run>/<target>")
    args = parser.parse_args(argv)
    export_dir = Path(args.export_dir)
    if not export_dir.is_dir():
        raise IntegrityError(f"{export_dir} is not a directory; pass an export directory (exports/<run>/<target>)")
    if not (export_dir / MANIFEST).exists():
        # exports/<run> holds exports one level down, exports/ two levels down; elsewhere nothing was exported
        inside = sorted(str(m.parent) for pattern in (f"*/{MANIFEST}", f"*/*/{MANIFEST}")
                        for m in export_dir.glob(pattern))
        if inside:
            shown = ", ".join(inside[:6]) + (f" (and {len(inside) - 6} more)" if len(inside) > 6 else "")
            raise IntegrityError(f"{export_dir} holds exports, not one; pass one of: {shown}")
        # artefacts without a manifest are an export that lost it: read_manifest says so below
        if not any(p.suffix.lower() in SUFFIXES for p in export_dir.iterdir()):
            raise IntegrityError(f"{export_dir} is not an export directory (no {MANIFEST} in it or below); pass "
                                 f"the directory python -m quant.export wrote: exports/<run>/<target>")
    count = len(read_manifest(export_dir)["artefacts"])
    found = verify_export(export_dir)
    if found:
        raise IntegrityError(f"{export_dir} does not match its manifest.json ({count} artefacts listed: "
                             f"{'; '.join(found)}); re-export with python -m quant.export ... --overwrite, or move "
                             f"files that are not the export's out of it")
    print(f"{export_dir}: all {count} artefacts match manifest.json (sha256)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
