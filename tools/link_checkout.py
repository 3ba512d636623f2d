#!/usr/bin/env python
"""Make this checkout importable as `fastrefine` (with `fastrefine.loaders` -> loaders/) in the running
Python's site-packages, without building anything: what `pip install -e .` does, for machines where pip
cannot build. setuptools 61-70.0 builds even an editable install through `bdist_wheel`, which needs the
`wheel` package; a bare host without network may lack it (Python 3.11's own venv ships setuptools 65.5
and no `wheel`).

    python tools/link_checkout.py            # writes SITE/fastrefine_checkout.pth and its finder module
    python tools/link_checkout.py --remove

The .pth file imports a small finder that maps exactly the two package roots of pyproject.toml's
[tool.setuptools] package-dir (fastrefine -> fastrefine/, fastrefine.loaders -> loaders/); every other
import is left to Python. `python -m fastrefine` works; the `fastrefine` console script is not written.
"""

from __future__ import annotations

import argparse
import sys
import sysconfig
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FINDER = "_fastrefine_checkout"

FINDER_SOURCE = '''"""Import hook written by tools/link_checkout.py: fastrefine and fastrefine.loaders from a checkout."""
import importlib.machinery
import importlib.util
import sys

ROOTS = {ROOTS!r}


class CheckoutFinder:
    @classmethod
    def find_spec(cls, name, path=None, target=None):
        if name not in ROOTS:
            return None
        init = ROOTS[name] + "/__init__.py"
        return importlib.util.spec_from_file_location(name, init, submodule_search_locations=[ROOTS[name]])


if not any(getattr(f, "__name__", "") == "CheckoutFinder" for f in sys.meta_path):
    sys.meta_path.insert(0, CheckoutFinder)
'''


def roots() -> dict[str, str]:
    return {"fastrefine": str(ROOT / "fastrefine"), "fastrefine.loaders": str(ROOT / "loaders")}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--remove", action="store_true", help="delete what this script wrote")
    ap.add_argument("--site", type=Path, default=Path(sysconfig.get_paths()["purelib"]),
                    help="site-packages folder (default: the running Python's)")
    a = ap.parse_args()
    pth, finder = a.site / "fastrefine_checkout.pth", a.site / f"{FINDER}.py"
    if a.remove:
        for p in (pth, finder):
            p.unlink(missing_ok=True)
        return 0
    for name, folder in roots().items():
        if not (Path(folder) / "__init__.py").is_file():
            print(f"link_checkout.py: {folder}/__init__.py not found (run from a fastrefine checkout)", file=sys.stderr)
            return 2
    finder.write_text(FINDER_SOURCE.replace("{ROOTS!r}", repr(roots())))
    pth.write_text(f"import {FINDER}\n")
    print(f"linked {ROOT} into {a.site}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
