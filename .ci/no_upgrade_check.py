"""Installing vram_magic changes none of the packages an environment has, when they are within its floors.

    .venv-oldest/bin/python .ci/no_upgrade_check.py [PROJECT_DIR]

Run with the interpreter of the environment to check (``make test-oldest`` runs it in ``.venv-oldest``, where
everything sits at the floors of ``.ci/floors.txt``). It asks that environment's pip what ``pip install
PROJECT_DIR`` (not editable; the project defaults to this repository) would do, without doing it
(``--dry-run --report``), and fails, naming each one, if any package already installed there would be
installed again at another version: an upgrade or a downgrade of torch, transformers, peft, accelerate,
bitsandbytes, IPython, ... Packages not installed yet, and vram_magic itself, may be installed.
"""

from __future__ import annotations

import importlib.metadata
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

PROJECT = "vram_magic"


def canonical(name: str) -> str:
    """A distribution's name as pip compares them (PEP 503)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def installed_versions() -> dict[str, str]:
    """Every distribution installed in this interpreter's environment: canonical name -> version."""
    return {canonical(dist.metadata["Name"]): dist.version for dist in importlib.metadata.distributions()}


def changes(report: dict[str, Any], installed: dict[str, str], project: str = PROJECT) -> list[str]:
    """What a ``pip install --report`` would change among the installed packages, one line each; the
    project itself is left out (it is what is being installed)."""
    found = []
    for item in report.get("install", []):
        name, version = item["metadata"]["name"], item["metadata"]["version"]
        key = canonical(name)
        if key == canonical(project) or key not in installed or installed[key] == version:
            continue
        found.append(f"{name}: {installed[key]} installed, pip would install {version}")
    return sorted(found)


def dry_run(project_dir: Path) -> dict[str, Any]:
    """pip's report of ``pip install PROJECT_DIR`` in this environment, nothing installed."""
    with tempfile.TemporaryDirectory() as folder:
        report = Path(folder) / "report.json"
        command = [sys.executable, "-m", "pip", "install", "--dry-run", "--quiet", "--report", str(report)]
        subprocess.run([*command, str(project_dir)], check=True)
        result: dict[str, Any] = json.loads(report.read_text())
        return result


def main(argv: list[str]) -> int:
    project_dir = Path(argv[1]) if len(argv) > 1 else Path(__file__).resolve().parents[1]
    installed = installed_versions()
    found = changes(dry_run(project_dir), installed)
    if found:
        print(f"pip install {project_dir} would change {len(found)} installed package(s) in {sys.prefix}:")
        for line in found:
            print(f"  {line}")
        return 1
    print(
        f"pip install {project_dir} changes none of the {len(installed)} packages installed in {sys.prefix}."
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
