"""Copy the dashboard's third-party browser assets from npm packages into the package.

`python -m orderflow.dashboard.vendor` (the Makefile runs it on install) installs the
versions pinned in dashboard/assets/package-lock.json with `npm ci` and copies
the built files, with their licences, into dashboard/static/vendor/.  The page
loads them from there: nothing comes from a CDN, so it works offline.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ASSETS = HERE / "assets"
VENDOR = HERE / "static" / "vendor"

# file in static/vendor -> file in node_modules
FILES: dict[str, str] = {
    "mermaid.min.js": "mermaid/dist/mermaid.min.js",
    "chart.umd.min.js": "chart.js/dist/chart.umd.min.js",
    "mermaid.LICENSE.txt": "mermaid/LICENSE",
    "chart.js.LICENSE.txt": "chart.js/LICENSE.md",
}


def missing() -> list[str]:
    return [name for name in FILES if not (VENDOR / name).is_file()]


def build(npm: str = "npm") -> None:
    if shutil.which(npm) is None:
        raise SystemExit(
            f"dashboard assets: {npm!r} not found; install Node.js and npm, then run "
            "`python -m orderflow.dashboard.vendor` (the dashboard works without them, "
            "showing the state diagram as text and the funnel as a table)"
        )
    subprocess.run(
        [npm, "ci", "--no-audit", "--no-fund", "--loglevel=error"], cwd=ASSETS, check=True
    )
    VENDOR.mkdir(parents=True, exist_ok=True)
    for name, source in FILES.items():
        shutil.copyfile(ASSETS / "node_modules" / source, VENDOR / name)


def main() -> int:
    try:
        build()
    except SystemExit as exc:
        print(exc, file=sys.stderr)
        return 0 if "--optional" in sys.argv else 1
    except subprocess.CalledProcessError as exc:
        print(f"dashboard assets: npm ci failed ({exc.returncode})", file=sys.stderr)
        return 0 if "--optional" in sys.argv else 1
    print(f"dashboard assets: {len(FILES)} files in {VENDOR}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
