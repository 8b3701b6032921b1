"""One run at a time per output folder: an advisory lock on a file in the folder.

MONAI, Ignite and PyTorch have no folder lock; `fcntl.flock` is the POSIX primitive whose lock the kernel drops with
the last descriptor, so a run that crashes or is killed never leaves the folder locked (a PID file would).
"""

from __future__ import annotations

import fcntl
import os
import socket
from pathlib import Path

LOCK_FILE = ".registration.lock"


class OutputFolderLocked(RuntimeError):
    """Another run holds the output folder's lock.

    Args:
        path: the lock file.
        holder: what the holder wrote into it (process id and host), possibly empty.
    """

    def __init__(self, path: Path, holder: str) -> None:
        self.path = path
        self.holder = holder
        by = f" by process {holder}" if holder else ""
        super().__init__(f"{path}: the output folder is in use{by}; wait for that run or choose another --output_dir")


class OutputFolderLock:
    """Exclusive, non-blocking lock on ``<folder>/.registration.lock``, held from :meth:`acquire` to :meth:`release`.

    The lock file stays in the folder (deleting it would let two runs lock two different files); it holds the
    holder's ``<pid> <host>`` for the refusal message.

    Args:
        folder: the output folder; created if needed.
    """

    def __init__(self, folder: str | Path) -> None:
        self.path = Path(folder) / LOCK_FILE
        self._descriptor: int | None = None

    def acquire(self) -> None:
        """Take the lock at once or refuse.

        Raises:
            OutputFolderLocked: another open of the lock file holds it (another run, or another rank's lock).
        """
        self.path.parent.mkdir(parents=True, exist_ok=True)
        descriptor = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(descriptor, 200).decode(errors="replace").strip()
            os.close(descriptor)
            raise OutputFolderLocked(self.path, holder) from None
        os.ftruncate(descriptor, 0)
        os.write(descriptor, f"{os.getpid()} {socket.gethostname()}\n".encode())
        self._descriptor = descriptor

    def release(self) -> None:
        """Drop the lock (closing the descriptor does); a no-op when not held."""
        if self._descriptor is not None:
            os.close(self._descriptor)
            self._descriptor = None

    def __enter__(self) -> OutputFolderLock:
        self.acquire()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.release()
