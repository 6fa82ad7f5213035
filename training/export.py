"""``python -m training.export STATE_DIR OUT.safetensors [--weights raw|ema] [--dtype bf16|fp32]``.

Writes the raw or EMA weights of a saved training state as a ComfyUI-loadable AAADiT file
(the run's own checkpoints hold the EMA weights when EMA is on).
"""

import argparse
import logging
import sys
from pathlib import Path

from aaa_core.errors import AAAError

from .checkpoints import SAVE_DTYPES, export_weights


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.export", description=__doc__.split("\n\n")[1])
    parser.add_argument("state", type=Path, help="a state folder, e.g. runs/pokemon/states/step-010000")
    parser.add_argument("output", type=Path, help="the .safetensors file to write")
    parser.add_argument("--weights", choices=["raw", "ema"], default="ema", help="which weights (default: ema)")
    parser.add_argument("--dtype", choices=sorted(SAVE_DTYPES), default="bf16", help="stored dtype (default: bf16)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    try:
        path = export_weights(args.state, args.output, args.weights, args.dtype)
    except AAAError as err:
        logging.error("%s", err)
        return 1
    logging.info("wrote %s (%s weights)", path, args.weights)
    return 0


if __name__ == "__main__":
    sys.exit(main())
