"""One PyTorch CPU thread for a block: the affine's and the refinement's small optimisation steps.

PyTorch has no context manager for its thread count (`torch.set_num_threads` is process-wide), hence this one.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


@contextmanager
def one_thread() -> Iterator[None]:
    """Run PyTorch's CPU operations of the block on one thread, then restore the thread count.

    A parallel reduction splits its sum by thread count, so its rounding depends on the thread count; Adam carries that
    rounding into the affine, and the refinement amplifies any change of its input into pixels (docs/design.md,
    "Results independent of the thread count"). Steps of a few ms also wait on each other across threads on a loaded
    CPU (docs/design.md, "Fine scale").
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
