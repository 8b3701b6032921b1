"""How `run inference` ends: its exit statuses, and SIGTERM turned into an exception so that a stopped run cleans up."""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from enum import IntEnum

from ..usage import USAGE_EXIT_STATUS


class ExitCode(IntEnum):
    """Exit status of `run inference` (documented in docs/README.md, "Exit codes")."""

    OK = 0  # every pair registered (warnings allowed)
    PAIR_FAILED = 1  # at least one pair of the run failed; every pair was tried, the table and summary written
    USAGE = USAGE_EXIT_STATUS  # the command line or config cannot run (scripts/usage.py exits with it)
    OUTPUT_LOCKED = 3  # another run holds the output folder
    TERMINATED = 128 + signal.SIGTERM  # stopped by SIGTERM; the unfinished pair left nothing behind


class Terminated(SystemExit):
    """SIGTERM, raised where the process is, so that every ``finally`` cleans up as for Ctrl-C."""

    def __init__(self) -> None:
        super().__init__(ExitCode.TERMINATED)


@contextmanager
def sigterm_raises() -> Iterator[None]:
    """Within the block, SIGTERM raises :class:`Terminated` instead of killing the process outright.

    Only the main thread can install a handler; elsewhere the block runs with the handler it has.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def terminate(signum: int, frame: object) -> None:
        raise Terminated()

    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
