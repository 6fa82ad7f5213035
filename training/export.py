"""``python -m training.export SOURCE OUT.safetensors [--weights raw|ema] [--base BASE] [--dtype bf16|fp32]``.

Writes a ComfyUI-loadable AAADiT file: the raw or EMA weights of a saved training state, or a LoRA
file merged into its base checkpoint (``W + strength * alpha/rank * B @ A``), for tools that take
no LoRA (the run's own checkpoints hold the EMA weights when EMA is on).

    python -m training.export runs/pokemon/states/step-010000 raw.safetensors --weights raw
    python -m training.export runs/pokemon-lora/checkpoints/pokemon-lora-lora-step-002000.safetensors \\
        merged.safetensors --base published
"""

import logging
import sys
from pathlib import Path

from aaa_core import downloads
from aaa_core.cli import OneLineParser
from aaa_core.errors import AAAError, InputError
from aaa_core.outputs import check_not_an_input

from .checkpoints import SAVE_DTYPES, export_weights, save_weights
from .lora import merge_lora_file
from .run_lock import check_not_in_running_states


def export_lora(lora: Path, output: Path, base: str, strength: float = 1.0, dtype: str = "bf16", model_dir: str = "") -> Path:
    """Merges a LoRA file into ``base`` (a file, or ``published`` for step-600000) and writes the full checkpoint."""
    base_path = downloads.resolve_model_file(downloads.DIT, None if base == "published" else base, model_dir or None)
    check_not_an_input([output], {"the LoRA file": lora, "the --base checkpoint": base_path})
    model = merge_lora_file(lora, base_path, strength)
    return save_weights(model.state_dict(), output, model.config, 0, f"{base_path.name} + {lora.name} x {strength:g}",
                        SAVE_DTYPES[dtype])


def main(argv: list[str] | None = None) -> int:
    parser = OneLineParser(prog="python -m training.export", description=__doc__.split("\n\n")[1])
    parser.add_argument("source", type=Path, help="a state folder (runs/pokemon/states/step-010000) or a LoRA .safetensors file")
    parser.add_argument("output", type=Path, help="the .safetensors file to write")
    parser.add_argument("--weights", choices=["raw", "ema"], default="ema", help="which weights of a state (default: ema)")
    parser.add_argument("--base", help="for a LoRA: the AAADiT checkpoint it was trained on, or 'published' (step-600000)")
    parser.add_argument("--strength", type=float, default=1.0, help="for a LoRA: how much of it to merge (default: 1)")
    parser.add_argument("--model-dir", default="", help="where 'published' is kept (default: $AAA_MODEL_DIR or ~/.cache/aaa_dit)")
    parser.add_argument("--dtype", choices=sorted(SAVE_DTYPES), default="bf16", help="stored dtype (default: bf16)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    try:
        check_not_in_running_states(args.output)
        if not args.source.exists():
            raise InputError(f"{args.source}: not found; expected a training state folder or a LoRA .safetensors file")
        if args.source.is_dir():
            path = export_weights(args.source, args.output, args.weights, args.dtype)
            what = f"{args.weights} weights"
        elif args.base is None:
            raise InputError(f"{args.source}: merging a LoRA needs the checkpoint it applies to: pass --base BASE.safetensors "
                             "or --base published")
        else:
            path = export_lora(args.source, args.output, args.base, args.strength, args.dtype, args.model_dir)
            what = f"{args.base} with {args.source.name} merged at strength {args.strength:g}"
    except AAAError as err:
        logging.error("%s", err)
        return 1
    logging.info("wrote %s (%s)", path, what)
    return 0


if __name__ == "__main__":
    sys.exit(main())
