"""Template-browser cards: every UI workflow has a current thumbnail, ComfyUI serves it, and the
sampler has room for its live preview.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image, ImageStat

from comfyui_harness import comfyui_test_marks, find_comfyui_root, run_in_comfyui, templates
from workflows.thumbnails import SIZE, TITLE_HEIGHT, digest, write_thumbnails

ROOT = Path(__file__).resolve().parents[1]
UI_WORKFLOWS = sorted((ROOT / "workflows").glob("*.json"))  # what the template browser lists
SAMPLERS = {"AAASampler", "KSampler", "KSamplerAdvanced", "SamplerCustom", "SamplerCustomAdvanced"}
PREVIEW_ROOM = 300  # the frontend draws the live preview inside the node, below its widgets


@pytest.mark.parametrize("workflow", UI_WORKFLOWS, ids=lambda path: path.stem)
def test_every_ui_workflow_has_a_current_jpeg_thumbnail(workflow: Path) -> None:
    thumbnail = workflow.with_suffix(".jpg")
    assert thumbnail.is_file(), f"{thumbnail.name} missing: run python workflows/thumbnails.py"
    with Image.open(thumbnail) as image:
        assert image.format == "JPEG" and image.size == SIZE
        assert image.info.get("comment", b"").decode() == digest(workflow), (
            f"{thumbnail.name} was drawn from another version of {workflow.name}: run python workflows/thumbnails.py"
        )
        assert min(ImageStat.Stat(image).stddev) > 10  # a drawing, not a blank card (0 for one colour)


def test_thumbnail_script_draws_any_workflow_dropped_in_the_folder(tmp_path: Path) -> None:
    """A new workflow with native and unknown nodes gets its picture by rerunning the script."""
    workflow = json.loads(UI_WORKFLOWS[0].read_text())
    workflow["nodes"][0]["type"] = "SomeOtherPackNode"
    workflow["nodes"][0]["widgets_values"] = {"named": "widgets"}
    (tmp_path / "new_graph.json").write_text(json.dumps(workflow))
    (written,) = write_thumbnails(tmp_path)
    assert written == tmp_path / "new_graph.jpg"
    with Image.open(written) as image:
        assert image.size == SIZE and image.info["comment"].decode() == digest(tmp_path / "new_graph.json")


def box(node: dict) -> tuple[float, float, float, float]:
    """The node's rectangle on the canvas, title bar included."""
    (x, y), (w, h) = node["pos"], node["size"]
    return x, y - TITLE_HEIGHT, x + w, y + h


@pytest.mark.parametrize("workflow", UI_WORKFLOWS, ids=lambda path: path.stem)
def test_samplers_leave_room_for_the_live_preview(workflow: Path) -> None:
    """A sampler is tall enough for its preview and overlaps no node, so the preview covers nothing."""
    nodes = json.loads(workflow.read_text())["nodes"]
    samplers = [n for n in nodes if n["type"] in SAMPLERS]
    assert samplers
    for sampler in samplers:
        assert sampler["size"][1] >= PREVIEW_ROOM + 22 * (len(sampler["widgets_values"]) + len(sampler["inputs"]))
        x0, y0, x1, y1 = box(sampler)
        for other in nodes:
            if other is not sampler:
                ox0, oy0, ox1, oy1 = box(other)
                assert ox1 <= x0 or ox0 >= x1 or oy1 <= y0 or oy0 >= y1, (sampler["type"], other["type"])


def test_comfyuis_template_routes_list_and_serve_every_workflow_and_thumbnail(tmp_path: Path) -> None:
    """Against a ComfyUI with the routes (0.10: set AAA_COMFYUI_PATH); the 2024 tree has none."""
    root = find_comfyui_root()
    if not (root / "app" / "custom_node_manager.py").is_file():
        pytest.skip(f"ComfyUI at {root} has no workflow_templates routes (they came in 2025)")
    files = [name for path in UI_WORKFLOWS for name in (path.name, path.with_suffix(".jpg").name)]
    run = run_in_comfyui(ROOT, [templates(ROOT, "aaa-dit", files)], tmp_path, timeout=240)
    outcome = run["actions"][0]
    assert outcome["supported"]
    assert sorted(outcome["listing"]["aaa-dit"]) == [path.stem for path in UI_WORKFLOWS]
    for name, response in outcome["served"].items():
        expected_type = "image/jpeg" if name.endswith(".jpg") else "application/json"
        assert (response["status"], response["content_type"]) == (200, expected_type), name
        assert response["bytes"] == (ROOT / "workflows" / name).stat().st_size


for _mark in comfyui_test_marks():  # a real ComfyUI tree, else skipped
    test_comfyuis_template_routes_list_and_serve_every_workflow_and_thumbnail = _mark(
        test_comfyuis_template_routes_list_and_serve_every_workflow_and_thumbnail
    )
