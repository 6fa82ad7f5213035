"""The training processes as one of them sees them: who it is, and how they wait for and agree with each other.

Every trainer module that must act once per run (the main process writes), split work (each
process its share) or wait for the others takes this one frozen value. Its defaults are one
process alone (tests, tools); the trainer builds it from accelerate (``distributed.processes_of``),
so this module, and the modules that only pass it on, stay free of accelerate.
"""

from __future__ import annotations

import dataclasses
from typing import Callable


def _nothing() -> None:
    return None


def _never() -> bool:
    return False


def _itself(value):
    return value


@dataclasses.dataclass(frozen=True)
class Processes:
    """This process's rank among ``world_size``, and the collectives every process calls at the same point."""

    rank: int = 0
    world_size: int = 1
    barrier: Callable[[], None] = _nothing  # waits until every process reaches it
    stop_requested: Callable[[], bool] = _never  # this process's own flag (Ctrl-C, SIGTERM): cheap, no collective
    any_true: Callable[[bool], bool] = _itself  # True on every process if it is True on any (a collective)
    main_value: Callable[[int], int] = _itself  # the main process's value on every process (a broadcast)

    @property
    def is_main(self) -> bool:
        """The global main process (rank 0): the one that writes the shared output folder."""
        return self.rank == 0

    def agree_to_stop(self, may_sync: bool) -> bool:
        """Whether every process stops after this step: all stop at the same one, so no collective is left waiting.

        One process alone checks its own flag every step; several agree only where ``may_sync``
        (the log steps), as the collective syncs the GPU.
        """
        if self.world_size == 1:
            return self.stop_requested()
        return may_sync and self.any_true(self.stop_requested())
