"""BufferPool never hands out memory that something still refers to, and reuses it afterwards."""

from __future__ import annotations

import gc
import threading

import numpy as np
import torch

from wsi_screen.buffers import BufferPool


def test_memory_is_reused_only_after_every_reference_is_gone() -> None:
    pool = BufferPool(limit=4)
    a = pool.take((4, 5, 3))
    a[...] = 1
    view = a[1:3, ::2]  # a view keeps the array (and its memory) in use
    tensor = torch.from_numpy(a)[None]
    flat = a.reshape(-1)
    del a
    b = pool.take((4, 5, 3))
    assert not np.shares_memory(b, view) and not np.shares_memory(b, flat)
    del view, flat
    c = pool.take((4, 5, 3))
    assert not np.shares_memory(c, tensor.numpy())  # the tensor still holds it
    first = tensor.numpy().__array_interface__["data"][0]
    del tensor
    gc.collect()
    d = pool.take((4, 5, 3))
    assert d.__array_interface__["data"][0] == first  # now free: handed out again
    assert pool.reused == 1 and pool.created == 3
    assert d.flags.c_contiguous and d.flags.writeable and d.dtype == np.uint8


def test_beyond_the_limit_arrays_are_plain_and_sizes_do_not_mix() -> None:
    pool = BufferPool(limit=2)
    kept = [pool.take((8, 8, 3)), pool.take((8, 8, 3))]
    extra = pool.take((8, 8, 3))
    assert extra.base is None  # not pooled
    assert pool.created == 2
    kept.pop()
    other = pool.take((4, 4, 3))  # the free buffer has another size: not used for this
    assert other.shape == (4, 4, 3) and pool.reused == 0
    again = pool.take((8, 8, 3))
    assert pool.reused == 1 and again.shape == (8, 8, 3)


def test_concurrent_takers_never_share_live_memory() -> None:
    pool = BufferPool(limit=6)
    errors: list[str] = []

    def work(value: int) -> None:
        for _ in range(300):
            arr = pool.take((16, 16, 3))
            arr.fill(value)
            if not (arr == value).all():
                errors.append(f"buffer of thread {value} overwritten")
            del arr

    threads = [threading.Thread(target=work, args=(v,)) for v in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert pool.created <= 6 and pool.reused > 0
