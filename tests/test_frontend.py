"""Every example workflow loads in the current web frontend: no missing nodes, no dialog, the layout its
thumbnail shows; every node's help page appears; the template browser shows each workflow's card.

Runs ``tests/frontend_check.py`` (a real ComfyUI server and headless Chromium, about a minute) only when
``AAA_FRONTEND_PYTHON`` names a Python with Playwright and ``AAA_COMFYUI_PATH`` a current ComfyUI whose
requirements this Python has; Chromium comes from ``AAA_CHROMIUM`` (default ``/usr/bin/chromium``).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FRONTEND_PYTHON = os.environ.get("AAA_FRONTEND_PYTHON")
COMFYUI = os.environ.get("AAA_COMFYUI_PATH")
CHROMIUM = shutil.which(os.environ.get("AAA_CHROMIUM", "/usr/bin/chromium"))

pytestmark = pytest.mark.skipif(
    not (FRONTEND_PYTHON and COMFYUI and CHROMIUM),
    reason="frontend check: set AAA_FRONTEND_PYTHON (a Python with playwright) and AAA_COMFYUI_PATH, and install chromium",
)


def test_every_example_workflow_loads_in_the_current_frontend(tmp_path: Path) -> None:
    command = [
        FRONTEND_PYTHON, str(ROOT / "tests" / "frontend_check.py"), "--comfyui", COMFYUI,
        "--comfyui-python", sys.executable, "--chromium", CHROMIUM, "--out", str(tmp_path),
    ]
    run = subprocess.run(command, capture_output=True, text=True, timeout=600)
    report_path = tmp_path / "report.json"
    assert report_path.is_file(), run.stdout[-4000:] + run.stderr[-4000:]
    report = json.loads(report_path.read_text())
    assert report["problems"] == []
    assert run.returncode == 0
    workflows = sorted(path.stem for path in (ROOT / "workflows").glob("*.json"))
    assert sorted(report["workflows"]) == workflows
    for result in report["workflows"].values():
        assert result["missing_types"] == [] and result["nodes_loaded"] == result["nodes"]
    assert report["help"] and all(report["help"].values())
    assert report["templates"]["titles_shown"] == workflows
