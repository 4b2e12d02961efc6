"""Measure what an install costs on disk: each virtual environment's size, its torch build and the largest
packages, written as a markdown table (docs/install-sizes.md, linked from docs/install.md).

    bash scripts/install.sh dev,wandb,sweep,llm,text   # .venv (scripts/test.sh makes it too)
    bash scripts/test_vision.sh                          # .venv-vision
    python scripts/install_sizes.py .venv .venv-vision
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "docs" / "install-sizes.md"
#: What the interpreter of a venv reports about its torch build.
PROBE = """
import json, torch
try:
    import torchvision
    vision = torchvision.__version__
except ImportError:
    vision = None
print(json.dumps({"torch": torch.__version__, "cuda": torch.version.cuda, "torchvision": vision}))
"""


def size_mb(path: Path) -> float:
    """Bytes of the regular files under ``path`` (links not followed), in MB (10^6)."""
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            file = Path(root) / name
            if not file.is_symlink():
                total += file.stat().st_size
    return total / 1e6


def largest(site: Path, count: int = 4) -> list[tuple[str, float]]:
    """The ``count`` largest top-level entries of a site-packages directory, in MB."""
    sizes = [(entry.name, size_mb(entry) if entry.is_dir() else entry.stat().st_size / 1e6) for entry in site.iterdir()]
    return sorted(sizes, key=lambda item: -item[1])[:count]


def describe(venv: Path) -> str:
    build = json.loads(
        subprocess.run([str(venv / "bin" / "python"), "-c", PROBE], capture_output=True, text=True, check=True).stdout
    )
    kind = f"CUDA {build['cuda']} build" if build["cuda"] else "CPU build"
    vision = f", torchvision {build['torchvision']}" if build["torchvision"] else ""
    (site,) = (venv / "lib").glob("python*/site-packages")
    top = ", ".join(f"{name} {mb:,.0f}" for name, mb in largest(site))
    return f"| `{venv.name}` | {size_mb(venv):,.0f} | torch {build['torch']} ({kind}){vision} | {top} |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("venvs", nargs="+", type=Path)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=REPO).stdout
    lines = [
        "# Install sizes",
        "",
        f"Command: `python scripts/install_sizes.py {' '.join(str(v) for v in args.venvs)}` "
        f"(commit {commit.strip()}, {datetime.date.today()}, Linux x86_64, Python 3.11). "
        "Sizes in MB (10^6 bytes) of the files in each virtual environment.",
        "",
        "| environment | MB on disk | torch | largest packages (MB) |",
        "|---|---|---|---|",
        *(describe(venv) for venv in args.venvs),
        "",
    ]
    args.out.write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
