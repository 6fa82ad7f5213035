"""The pack imported the way ComfyUI imports it: as a package whose modules use relative imports.

A plain ``import nodes`` would not work (and would clash with ComfyUI's own ``nodes``). The pack's
copy of ``aaa_core`` is therefore ``aaa_pack.aaa_core``, with its own error classes, separate from
the top-level ``aaa_core`` the CLI and the reference computations use. The nodes import ComfyUI,
so ComfyUI is imported first (``comfyui_inprocess``); a test module that imports this one is
skipped where there is no ComfyUI tree.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

from comfyui_harness import NO_TREE
from comfyui_inprocess import boot

ROOT = Path(__file__).resolve().parents[1]
PACK_NAME = "aaa_pack"


def import_pack():
    """Imports the repository root as the package ComfyUI sees (relative imports and all)."""
    if PACK_NAME in sys.modules:
        return sys.modules[PACK_NAME]
    if boot() is None:
        pytest.skip(NO_TREE, allow_module_level=True)
    spec = importlib.util.spec_from_file_location(PACK_NAME, ROOT / "__init__.py", submodule_search_locations=[str(ROOT)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[PACK_NAME] = module
    spec.loader.exec_module(module)
    return module


def pack_module(name: str):
    """A module of the imported pack, e.g. ``pack_module("nodes.comfy_bridge")``."""
    import_pack()
    return sys.modules[f"{PACK_NAME}.{name}"]


NODES = import_pack().NODE_CLASS_MAPPINGS


def node(node_id: str):
    """The node's function, bound to a fresh instance, as ComfyUI's executor calls it."""
    cls = NODES[node_id]
    return getattr(cls(), cls.FUNCTION)
