"""Registry-ready: a current help page per node, the [tool.comfy] metadata, the icon and the publish workflow.

What the frontend and the Comfy Registry read is in docs/comfyui.md section 10.
"""

from __future__ import annotations

import re
import tomllib
import xml.etree.ElementTree as ElementTree
from pathlib import Path

import pytest
import yaml

from pack_import import NODES, import_pack

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "web" / "docs"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
# The classifier values the registry accepts; one unknown value voids them all (docs/comfyui.md section 10).
REGISTRY_OS = ("Microsoft", "POSIX", "MacOS", "OS Independent")
REGISTRY_ACCELERATORS = {"GPU :: NVIDIA CUDA", "GPU :: AMD ROCm", "GPU :: Intel Arc", "NPU :: Huawei Ascend", "GPU :: Apple Metal"}


def listed_names(page: str, heading: str) -> list[str]:
    """The names the list under ``## heading`` explains, one item each: ``- `name` (type): what it does``."""
    section = re.search(rf"^## {heading}\n(.*?)(?=^## |\Z)", page, re.M | re.S)
    assert section, f"no '## {heading}' section"
    return re.findall(r"^- `([^`]+)` \(", section.group(1), re.M)


@pytest.mark.parametrize("node_id", sorted(NODES))
def test_every_node_has_a_help_page_that_names_its_inputs_and_outputs(node_id: str) -> None:
    page_path = DOCS / f"{node_id}.md"
    assert page_path.is_file(), f"{node_id} has no help page: write web/docs/{node_id}.md"
    page = page_path.read_text(encoding="utf-8")
    assert page.startswith(f"# {import_pack().NODE_DISPLAY_NAME_MAPPINGS[node_id]}\n")
    cls = NODES[node_id]
    inputs = cls.INPUT_TYPES()
    assert listed_names(page, "Inputs") == [*inputs.get("required", {}), *inputs.get("optional", {})]
    assert listed_names(page, "Outputs") == list(getattr(cls, "RETURN_NAMES", None) or cls.RETURN_TYPES)


def test_no_help_page_without_its_node() -> None:
    assert sorted(path.stem for path in DOCS.glob("*.md")) == sorted(NODES)


def test_comfyui_serves_web_and_the_registry_ships_it() -> None:
    """WEB_DIRECTORY is what ComfyUI serves as /extensions/<pack>/; includes keeps it in the archive."""
    web = (ROOT / import_pack().WEB_DIRECTORY).resolve()
    assert web == DOCS.parent
    assert any(Path(entry).resolve() == web for entry in PYPROJECT["tool"]["comfy"]["includes"])


def test_tool_comfy_has_every_field_the_registry_shows() -> None:
    comfy = PYPROJECT["tool"]["comfy"]
    assert re.fullmatch(r"[a-z0-9][a-z0-9-]*", comfy["PublisherId"])
    assert comfy["DisplayName"].strip()
    assert re.fullmatch(r"(>=|>|<=|<|~=|!=)\d+\.\d+\.\d+(,(>=|>|<=|<|~=|!=)\d+\.\d+\.\d+)*", comfy["requires-comfyui"])


def test_icon_is_a_square_image_at_most_400_px_from_this_repository() -> None:
    repository = PYPROJECT["project"]["urls"]["Repository"]
    owner_repo = re.fullmatch(r"https://github\.com/([^/]+/[^/]+)", repository).group(1)
    match = re.fullmatch(rf"https://raw\.githubusercontent\.com/{re.escape(owner_repo)}/main/(.+)", PYPROJECT["tool"]["comfy"]["Icon"])
    assert match, "Icon must be the raw URL of a file in the Repository"
    svg = ElementTree.parse(ROOT / match.group(1)).getroot()
    assert svg.tag == "{http://www.w3.org/2000/svg}svg"
    assert svg.get("width") == svg.get("height") and int(svg.get("width")) <= 400


def test_classifiers_are_all_ones_the_registry_accepts() -> None:
    classifiers = PYPROJECT["project"]["classifiers"]
    systems = [c.removeprefix("Operating System :: ") for c in classifiers if c.startswith("Operating System :: ")]
    accelerators = [c.removeprefix("Environment :: ") for c in classifiers if c.startswith("Environment :: ")]
    assert systems and all(s.startswith(REGISTRY_OS) for s in systems)
    assert accelerators and set(accelerators) <= REGISTRY_ACCELERATORS


def test_publish_workflow_runs_the_registry_action_when_pyproject_changes_on_main() -> None:
    workflow = yaml.safe_load((ROOT / ".github" / "workflows" / "publish.yml").read_text(encoding="utf-8"))
    push = workflow[True]["push"]  # YAML 1.1 reads the key `on` as True
    assert push["branches"] == ["main"] and push["paths"] == ["pyproject.toml"]
    (publish,) = [step for step in workflow["jobs"]["publish-node"]["steps"] if "publish-node-action" in step.get("uses", "")]
    assert publish["uses"].startswith("Comfy-Org/publish-node-action@")
    assert publish["with"]["personal_access_token"] == "${{ secrets.REGISTRY_ACCESS_TOKEN }}"
