"""Graceful stop: the first Ctrl-C (SIGINT) or SIGTERM asks the trainer to save and exit; a second Ctrl-C aborts."""

from __future__ import annotations

import logging
import signal
import threading

log = logging.getLogger(__name__)


class StopRequest:
    """A flag set by SIGINT/SIGTERM while installed; the loop checks it between steps.

    Handling the signal instead of letting KeyboardInterrupt fly means the step in progress
    finishes, so the saved state is consistent. SIGTERM is what schedulers (SLURM, Kubernetes)
    send before killing a job.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.requested = False
        self._previous: dict[int, object] = {}

    def __call__(self) -> bool:
        return self.requested

    def _handle(self, signum: int, frame: object) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt  # second Ctrl-C: stop now, without saving
        self.requested = True
        log.warning("%s received: finishing this step, then saving a checkpoint and the training state "
                    "(Ctrl-C again to abort without saving)", signal.Signals(signum).name)

    def install(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():  # signal handlers live in the main thread only
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def restore(self) -> None:
        """Puts the previous handlers back (the process may go on, as in tests or notebooks)."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
