"""``python -m training`` and ``accelerate launch -m training``: see ``train.py``."""

import sys

from .train import main

sys.exit(main())
