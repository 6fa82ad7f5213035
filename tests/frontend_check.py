"""Loads every example workflow into ComfyUI's real web frontend, headless, and reports what a user sees.

It starts ComfyUI's server (``main.py --cpu``) on a temporary base directory whose ``custom_nodes``
links to this checkout, opens the frontend in Chromium through Playwright, and checks:

- each ``workflows/*.json``, loaded as a drop onto the canvas does (``app.loadGraphData``): node
  types the frontend does not know, dialogs it opens (the missing-nodes dialog among them), widget
  values that do not survive a save, and node boxes that differ from the file's, which is what
  ``workflows/thumbnails.py`` draws; plus a screenshot of the whole graph;
- every node of the pack: its help page (``web/docs/<node id>.md``) in the Info panel;
- the template browser: the pack's entry and one card per workflow, each with its thumbnail.

It writes ``report.json`` and the screenshots to ``--out`` and exits 1 when anything is wrong.
It needs a current ComfyUI checkout with its requirements (``--comfyui``, default
``$AAA_COMFYUI_PATH``), the Python that runs it (``--comfyui-python``), Chromium and Playwright
(``pip install playwright``; the system's Chromium is used, nothing is downloaded):

    python tests/frontend_check.py --comfyui ~/ComfyUI --comfyui-python ~/ComfyUI/.venv/bin/python --out /tmp/frontend

``tests/test_frontend.py`` runs it when ``AAA_FRONTEND_PYTHON`` names a Python with Playwright.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from contextlib import contextmanager
from pathlib import Path

try:
    from playwright.sync_api import TimeoutError as PlaywrightTimeout
    from playwright.sync_api import sync_playwright
except ImportError:
    sys.exit("tests/frontend_check.py needs Playwright in this Python: pip install playwright")

log = logging.getLogger("frontend_check")
ROOT = Path(__file__).resolve().parents[1]
WORKFLOWS = sorted((ROOT / "workflows").glob("*.json"))
PACK_FOLDER = "aaa-dit"  # the folder name users clone into; the template browser lists it under this name
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run",
]
VIEWPORT = {"width": 2200, "height": 1300}  # wide enough that a fitted graph is drawn in full detail
BOX_TOLERANCE = 1.0  # graph units: a node the frontend moved or resized by more is drawn wrongly in its thumbnail


@contextmanager
def comfyui_server(comfyui: Path, python: str, log_path: Path):
    """ComfyUI's server on a free local port, with this checkout as its only custom node pack; yields the URL."""
    with tempfile.TemporaryDirectory(prefix="aaa-frontend-") as base:
        (Path(base) / "custom_nodes").mkdir()
        (Path(base) / "custom_nodes" / PACK_FOLDER).symlink_to(ROOT, target_is_directory=True)
        settings = Path(base) / "user" / "default" / "comfy.settings.json"
        settings.parent.mkdir(parents=True)
        settings.write_text(json.dumps({"Comfy.TutorialCompleted": True}))  # no first-run template dialog
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        command = [
            python, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port), "--base-directory", base,
            "--disable-auto-launch", "--database-url", "sqlite:///:memory:",
        ]
        env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}  # leaves the ComfyUI checkout as it was
        with open(log_path, "wb") as server_log:
            server = subprocess.Popen(command, cwd=comfyui, stdout=server_log, stderr=subprocess.STDOUT, env=env)
            try:
                url = f"http://127.0.0.1:{port}"
                wait_until_up(url, server, log_path)
                yield url
            finally:
                server.terminate()
                server.wait(timeout=30)


def wait_until_up(url: str, server: subprocess.Popen, log_path: Path, timeout: float = 240.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"ComfyUI exited with {server.returncode}; see {log_path}")
        try:
            with urllib.request.urlopen(f"{url}/system_stats", timeout=5):
                return
        except OSError:
            time.sleep(1)
    raise RuntimeError(f"ComfyUI did not answer within {timeout:.0f} s; see {log_path}")


def fetch_json(url: str):
    with urllib.request.urlopen(url, timeout=30) as response:
        return json.load(response)


# Runs in the page: loads a workflow as a drop does, then reads back what the frontend made of it.
LOAD_WORKFLOW = """async ([workflow, name]) => {
  await app.loadGraphData(structuredClone(workflow), true, true, name);
  await new Promise(resolve => setTimeout(resolve, 500));
  const saved = app.graph.serialize();
  return {
    nodes: app.graph.nodes.map(n => ({id: n.id, type: n.type, pos: [...n.pos], size: [...n.size],
                                      known: n.type in LiteGraph.registered_node_types})),
    widgets: Object.fromEntries(saved.nodes.map(n => [n.id, n.widgets_values ?? null])),
    dialogs: [...document.querySelectorAll('[role=dialog]')].map(d => d.innerText.trim()).filter(Boolean),
  };
}"""


def check_workflow(page, path: Path, out: Path) -> dict:
    workflow = json.loads(path.read_text(encoding="utf-8"))
    loaded = page.evaluate(LOAD_WORKFLOW, [workflow, path.stem])
    frontend = {node["id"]: node for node in loaded["nodes"]}
    boxes, widgets = [], []
    for node in workflow["nodes"]:
        shown = frontend.get(node["id"])
        if shown is None:
            continue
        drift = max(abs(a - b) for a, b in zip([*node["pos"], *node["size"]], [*shown["pos"], *shown["size"]]))
        if drift > BOX_TOLERANCE:
            boxes.append({"node": node["id"], "type": node["type"], "file": [node["pos"], node["size"]],
                          "frontend": [shown["pos"], shown["size"]]})
        saved = loaded["widgets"].get(str(node["id"]))
        if node.get("widgets_values") is not None and saved != node["widgets_values"]:
            widgets.append({"node": node["id"], "type": node["type"], "file": node["widgets_values"], "frontend": saved})
    page.evaluate("app.extensionManager.command.execute('Comfy.Canvas.FitView')")
    page.wait_for_timeout(500)
    screenshot = out / f"{path.stem}.png"
    page.screenshot(path=str(screenshot))
    return {
        "nodes": len(workflow["nodes"]),
        "nodes_loaded": len(loaded["nodes"]),
        "missing_types": sorted({n["type"] for n in loaded["nodes"] if not n["known"]}),
        "dialogs": loaded["dialogs"],
        "boxes_changed": boxes,
        "widgets_changed": widgets,
        "screenshot": str(screenshot),
    }


def first_paragraph(node_id: str) -> str:
    """The help page's first line of prose: what the Info panel must show."""
    page = (ROOT / "web" / "docs" / f"{node_id}.md").read_text(encoding="utf-8")
    line = next(line for line in page.splitlines() if line and not line.startswith("#"))
    return re.sub(r"[*`]", "", line)  # Markdown's emphasis and code marks are not in the rendered text


def check_help_pages(page, node_ids: list[str], out: Path) -> dict:
    """Adds each node alone and selects it: the Info panel (opened with Node Info) must show its help page."""
    shown = {}
    for node_id in node_ids:
        page.evaluate("""(type) => { app.graph.clear(); const node = LiteGraph.createNode(type);
                         node.pos = [200, 200]; app.graph.add(node); app.canvas.selectNode(node);
                         app.canvas.setDirty(true, true); }""", node_id)
        expected = first_paragraph(node_id)
        shown[node_id] = False
        for _ in range(2):  # the button toggles the panel, which stays open from the node before
            try:
                page.wait_for_function("(text) => document.body.innerText.includes(text)", arg=expected, timeout=5_000)
                shown[node_id] = True
                break
            except PlaywrightTimeout:
                page.get_by_role("button", name="Node Info").click()
        if not shown[node_id]:
            page.screenshot(path=str(out / f"help-{node_id}.png"))
    page.screenshot(path=str(out / "help-panel.png"))
    return shown


def check_templates(page, url: str, out: Path) -> dict:
    """Opens Browse Templates, picks the pack's entry and checks one card with a loaded thumbnail per workflow.

    The frontend fetches each thumbnail and shows it from a blob: URL, so the fetches are what name the files.
    """
    listing = fetch_json(f"{url}/api/workflow_templates").get(PACK_FOLDER, [])
    prefix = f"/api/workflow_templates/{PACK_FOLDER}/"
    fetched: dict[str, int] = {}

    def record(response) -> None:
        path = urllib.parse.unquote(urllib.parse.urlsplit(response.url).path)
        if path.startswith(prefix):
            fetched[path.removeprefix(prefix)] = response.status

    page.on("response", record)
    page.evaluate("app.extensionManager.command.execute('Comfy.BrowseTemplates')")
    dialog = page.get_by_role("dialog")
    dialog.get_by_text(PACK_FOLDER, exact=True).click()
    page.wait_for_function(
        "(count) => [...document.querySelectorAll('[role=dialog] img')]"
        ".filter(img => img.complete && img.naturalWidth > 0).length >= count",
        arg=len(listing), timeout=20_000,
    )
    shown_images = page.evaluate(
        "[...document.querySelectorAll('[role=dialog] img')].filter(img => img.complete && img.naturalWidth > 0)"
        ".map(img => [img.naturalWidth, img.naturalHeight])"
    )
    text = dialog.inner_text()
    screenshot = out / "templates.png"
    page.screenshot(path=str(screenshot))
    page.remove_listener("response", record)
    return {
        "listed": sorted(listing),
        "thumbnails_fetched": sorted(name for name, status in fetched.items() if name.endswith(".jpg") and status == 200),
        "images_shown": shown_images,
        "titles_shown": sorted(name for name in listing if name in text),
        "screenshot": str(screenshot),
    }


def problems(report: dict) -> list[str]:
    """Every finding that a user would notice, one line each."""
    found = []
    for name, result in report["workflows"].items():
        if result["missing_types"]:
            found.append(f"{name}: node types missing in the frontend: {', '.join(result['missing_types'])}")
        if result["nodes_loaded"] != result["nodes"]:
            found.append(f"{name}: {result['nodes_loaded']} of {result['nodes']} nodes loaded")
        found += [f"{name}: a dialog opened: {text[:200]!r}" for text in result["dialogs"]]
        found += [f"{name}: node {c['node']} ({c['type']}) moved or resized: {c}" for c in result["boxes_changed"]]
        found += [f"{name}: node {c['node']} ({c['type']}) widget values changed: {c}" for c in result["widgets_changed"]]
    found += [f"{node_id}: the Info panel does not show web/docs/{node_id}.md" for node_id, ok in report["help"].items() if not ok]
    templates = report["templates"]
    expected = sorted(path.stem for path in WORKFLOWS)
    if templates["listed"] != expected or templates["titles_shown"] != expected:
        found.append(f"template browser lists {templates['listed']}, shows {templates['titles_shown']}, expected {expected}")
    if templates["thumbnails_fetched"] != sorted(f"{name}.jpg" for name in expected) or len(templates["images_shown"]) != len(expected):
        found.append(f"template browser fetched {templates['thumbnails_fetched']} and shows {len(templates['images_shown'])} pictures")
    return found


def run(comfyui: Path, python: str, chromium: str, out: Path) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    with comfyui_server(comfyui, python, out / "comfyui.log") as url, sync_playwright() as playwright:
        pack_nodes = sorted(
            node_id for node_id, info in fetch_json(f"{url}/object_info").items()
            if info.get("python_module") == f"custom_nodes.{PACK_FOLDER}"
        )
        browser = playwright.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport=VIEWPORT)
            page.goto(url, wait_until="domcontentloaded")
            page.wait_for_function(
                "(ids) => window.app?.graph && window.LiteGraph && ids.every(id => id in LiteGraph.registered_node_types)",
                arg=pack_nodes, timeout=120_000,
            )
            report = {
                "comfyui": fetch_json(f"{url}/system_stats")["system"].get("comfyui_version"),
                "pack_nodes": pack_nodes,
                "workflows": {path.stem: check_workflow(page, path, out) for path in WORKFLOWS},
                "help": check_help_pages(page, pack_nodes, out),
                "templates": check_templates(page, url, out),  # last: its dialog stays open
            }
        finally:
            browser.close()
    report["problems"] = problems(report)
    (out / "report.json").write_text(json.dumps(report, indent=2))
    return report


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--comfyui", default=os.environ.get("AAA_COMFYUI_PATH"), help="a current ComfyUI checkout (default: $AAA_COMFYUI_PATH)")
    parser.add_argument("--comfyui-python", default=sys.executable, help="the Python with ComfyUI's requirements (default: this one)")
    parser.add_argument("--chromium", default="/usr/bin/chromium", help="the Chromium executable (default: %(default)s)")
    parser.add_argument("--out", type=Path, default=Path("frontend-check"), help="folder for report.json and screenshots (default: %(default)s)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if not args.comfyui:
        parser.error("no ComfyUI: pass --comfyui or set AAA_COMFYUI_PATH")
    report = run(Path(args.comfyui).resolve(), args.comfyui_python, args.chromium, args.out)
    for name, result in report["workflows"].items():
        log.info("%s: %d nodes loaded, screenshot %s", name, result["nodes_loaded"], result["screenshot"])
    for line in report["problems"]:
        log.error("%s", line)
    log.info("%s problems; report in %s", len(report["problems"]) or "no", args.out / "report.json")
    return 1 if report["problems"] else 0


if __name__ == "__main__":
    sys.exit(main())
