"""Link the multi-gigabyte binary distributions (torch, torchvision, triton, the CUDA runtime packages) of
the development environment into a fresh virtual environment before `make wheel-test` installs the wheel.

pip then finds them installed (their dist-info is linked too), resolves the wheel's requirements against
them and installs every other core dependency for real; only the ~5 GB of prebuilt libraries are shared
instead of copied (a CI machine's disk held the development venv, a clean clone's venv and this one).
Run with the development environment's python: ``python tests/link_binary_deps.py TARGET_SITE_PACKAGES``.
"""

from __future__ import annotations

import re
import sys
from importlib import metadata
from pathlib import Path

HEAVY = re.compile(r"^(torch|torchvision|triton|nvidia-.*|cuda-.*)$")


def top_level_entries(dist: metadata.Distribution) -> set[str]:
    """First path components of a distribution's files inside site-packages (scripts in ../bin excluded)."""
    return {Path(f).parts[0] for f in dist.files or () if Path(f).parts and Path(f).parts[0] != ".."}


def main(target: str) -> None:
    target_dir = Path(target)
    if not target_dir.is_dir():
        raise SystemExit(f"link_binary_deps: {target_dir} is not a site-packages folder")
    linked: list[str] = []
    for dist in metadata.distributions():
        name = (dist.metadata["Name"] or "").lower().replace("_", "-")
        if not HEAVY.match(name):
            continue
        site = Path(dist.locate_file(""))
        for entry in sorted(top_level_entries(dist)):
            dst = target_dir / entry
            if not dst.exists() and (site / entry).exists():
                dst.symlink_to(site / entry)
                linked.append(entry)
    if not any(e.startswith("torch-") and e.endswith(".dist-info") for e in linked):
        raise SystemExit("link_binary_deps: torch is not installed in the development environment")
    print(f"linked {len(linked)} entries of the binary dependencies into {target_dir}")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit("usage: python tests/link_binary_deps.py TARGET_SITE_PACKAGES")
    main(sys.argv[1])
