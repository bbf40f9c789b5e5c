"""Recycled uint8 buffers for the reader's windows.

A read window of a few MiB is at least glibc's mmap threshold (``runtime.limit_heap_growth``), so a
new one is a fresh mapping whose pages fault in, zero-filled, on first write, and go back to the OS
when it is freed: on the 20,000² benchmark slide that cost about as much as copying the tiles into
the windows. A :class:`BufferPool` keeps the memory and hands out a new array over it once the
previous array over the same memory is gone.
"""

from __future__ import annotations

import threading
import weakref
from collections import defaultdict

import numpy as np
from numpy.typing import NDArray

__all__ = ["BufferPool"]


class BufferPool:
    """uint8 arrays over recycled memory, reused only once nothing refers to the previous array.

    Each array handed out is over a ``bytearray`` the pool keeps; every view, slice, reshape or
    ``torch.from_numpy`` of the array refers to the array itself (its base is not an ndarray, so
    numpy does not collapse views past it), so a weak reference to it dies only when the consumer
    holds none of them any more, and only then is the memory handed out again. (Code that keeps a
    raw pointer without a reference is not seen: hand it a copy.) At most ``limit`` buffers are
    kept; beyond that :meth:`take` returns plain new arrays. The memory kept never exceeds the
    largest number of arrays alive at once. Thread-safe.
    """

    def __init__(self, limit: int) -> None:
        self.limit = max(0, int(limit))
        self._lock = threading.Lock()
        self._free: defaultdict[int, list[bytearray]] = defaultdict(list)
        self._lent: dict[int, tuple[weakref.ref[NDArray[np.uint8]], bytearray]] = {}
        self.reused = 0
        self.created = 0

    def take(self, shape: tuple[int, ...]) -> NDArray[np.uint8]:
        """An uninitialised C-contiguous uint8 array of ``shape``, on recycled memory when free."""
        nbytes = int(np.prod(shape))
        with self._lock:
            free = self._free[nbytes]
            if free:
                buf = free.pop()  # the most recently returned: the likeliest still in a cache
                self.reused += 1
            elif self.created < self.limit:
                buf = bytearray(nbytes)
                self.created += 1
            else:
                return np.empty(shape, np.uint8)
            arr: NDArray[np.uint8] = np.ndarray(shape, np.uint8, buffer=buf)
            ref = weakref.ref(arr, self._returned)
            self._lent[id(ref)] = (ref, buf)
        return arr

    def _returned(self, ref: weakref.ref[NDArray[np.uint8]]) -> None:
        # Runs where the last reference dies, in any thread, possibly inside take() (a garbage
        # collection there): single dict/list operations only, no lock.
        _, buf = self._lent.pop(id(ref))
        self._free[len(buf)].append(buf)
