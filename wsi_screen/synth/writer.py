"""Write a layout as a tiled, JPEG-compressed, pyramidal TIFF (generic or Aperio SVS flavour).

The slide is rendered strip by strip (a band of tile rows; in a process pool when there are enough
strips). Each strip's level-0 tiles are JPEG-encoded where it was rendered and streamed into the
file; its downsampled copy feeds the next pyramid level, whose tiles are encoded as soon as a tile
row is complete and kept in a temporary spool file until level 0 is written. Memory is bounded by
a few strips, whatever the slide size; the same arguments always give the same bytes.

JPEG tiles are stored as RGB (Adobe marker, no YCbCr transform, no chroma subsampling), so every
decoder sees the same samples: OpenSlide and tiffslide return identical pixels.
"""

from __future__ import annotations

import logging
import math
import os
import tempfile
import time
from collections import deque
from collections.abc import Generator, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import IO, Any, Literal

import numpy as np
from numpy.typing import NDArray
from PIL import Image, ImageDraw

from wsi_screen.synth.layout import Layout
from wsi_screen.synth.render import Renderer

__all__ = ["SlideFormat", "WriteStats", "pyramid_dimensions", "write_slide"]

logger = logging.getLogger(__name__)

SlideFormat = Literal["tiff", "svs"]
U8 = NDArray[np.uint8]

#: Aim for about this many level-0 pixels per strip (bounds memory, keeps the pool busy).
_STRIP_TARGET_PX = 40_000_000
_APERIO_HEAD = "Aperio Image Library v12.0.15 \r\n"
_THUMBNAIL_MAX = 1024


@dataclass(frozen=True)
class WriteStats:
    """What :func:`write_slide` wrote and how long it took (seconds)."""

    path: Path
    level_dimensions: tuple[tuple[int, int], ...]
    n_strips: int
    workers: int
    file_bytes: int
    timings: dict[str, float]


def pyramid_dimensions(
    width: int, height: int, *, level_factor: int = 4, smallest_level_px: int = 1024
) -> tuple[tuple[int, int], ...]:
    """Level sizes: each level is the previous one ÷ ``level_factor`` (floor), until the largest
    side is at most ``smallest_level_px``."""
    if level_factor not in (2, 4):
        raise ValueError(f"level_factor must be 2 or 4, got {level_factor}")
    dims = [(int(width), int(height))]
    while max(dims[-1]) > smallest_level_px:
        w, h = dims[-1][0] // level_factor, dims[-1][1] // level_factor
        if w < 1 or h < 1:
            break
        dims.append((w, h))
    return tuple(dims)


def _encode_tile_row(rows: U8, tile: int, quality: int) -> list[bytes]:
    """JPEG-encode a band of at most ``tile`` rows as full tiles (edges padded by replication)."""
    import imagecodecs

    w = rows.shape[1]
    out: list[bytes] = []
    for x in range(0, w, tile):
        t = rows[:, x : x + tile]
        if t.shape[0] < tile or t.shape[1] < tile:
            t = np.pad(t, ((0, tile - t.shape[0]), (0, tile - t.shape[1]), (0, 0)), mode="edge")
        out.append(
            bytes(
                imagecodecs.jpeg8_encode(
                    np.ascontiguousarray(t),
                    level=quality,
                    colorspace="RGB",
                    outcolorspace="RGB",
                    subsampling="444",
                )
            )
        )
    return out


def _downsample(img: U8, factor: int) -> U8:
    """Box-average by ``factor`` (floor size: a partial last block is dropped)."""
    h, w = img.shape[0] // factor, img.shape[1] // factor
    if h == 0 or w == 0:
        return np.zeros((h, max(w, 0), 3), dtype=np.uint8)
    pil = Image.fromarray(np.ascontiguousarray(img[: h * factor, : w * factor]))
    return np.asarray(pil.reduce(factor), dtype=np.uint8)


@dataclass(frozen=True)
class _StripPlan:
    width: int
    height: int
    strip_h: int
    tile: int
    quality: int
    factor: int

    @property
    def n_strips(self) -> int:
        return math.ceil(self.height / self.strip_h)


class _StripJob:
    """Renders and encodes one strip (lives in each worker process)."""

    def __init__(self, layout: Layout, plan: _StripPlan) -> None:
        self.plan = plan
        self.renderer = Renderer(layout)

    def run(self, index: int) -> tuple[list[bytes], U8, float, float]:
        p = self.plan
        y0 = index * p.strip_h
        h = min(p.strip_h, p.height - y0)
        t0 = time.perf_counter()
        img = self.renderer.render(0, y0, p.width, h)
        t1 = time.perf_counter()
        tiles: list[bytes] = []
        for ty in range(0, h, p.tile):
            tiles += _encode_tile_row(img[ty : ty + p.tile], p.tile, p.quality)
        small = _downsample(img, p.factor)
        return tiles, small, t1 - t0, time.perf_counter() - t1


_JOB: _StripJob | None = None


def _init_worker(layout: Layout, plan: _StripPlan) -> None:
    global _JOB
    _JOB = _StripJob(layout, plan)


def _run_strip(index: int) -> tuple[list[bytes], U8, float, float]:
    assert _JOB is not None, "worker not initialised"
    return _JOB.run(index)


class _LevelSink:
    """Receives the rows of one lower pyramid level, encodes full tile rows into the spool, and
    feeds its own downsampled rows to the next level."""

    def __init__(
        self,
        dims: tuple[int, int],
        *,
        tile: int,
        quality: int,
        factor: int,
        spool: IO[bytes],
        next_sink: _LevelSink | None,
        keep_pixels: bool,
    ) -> None:
        self.width, self.height = dims
        self.tile, self.quality, self.factor = tile, quality, factor
        self.spool, self.next = spool, next_sink
        self.pending: list[U8] = []
        self.n_pending = 0
        self.rows_done = 0
        self.tiles: list[tuple[int, int]] = []  # (offset, length) in the spool
        self.carry: U8 = np.zeros((0, self.width, 3), dtype=np.uint8)  # rows not yet downsampled
        self.pixels: U8 | None = (
            np.empty((self.height, self.width, 3), dtype=np.uint8) if keep_pixels else None
        )

    def push(self, rows: U8) -> None:
        rows = rows[: self.height - self.rows_done - self.n_pending, : self.width]
        if rows.shape[0] == 0:
            return
        self.pending.append(rows)
        self.n_pending += rows.shape[0]
        if self.next is not None:
            self.carry = np.concatenate([self.carry, rows]) if self.carry.size else rows
            usable = (self.carry.shape[0] // self.factor) * self.factor
            if usable:
                self.next.push(_downsample(self.carry[:usable], self.factor))
                self.carry = self.carry[usable:]
        while self.n_pending >= self.tile:
            self._flush(self.tile)

    def _flush(self, n: int) -> None:
        band = np.concatenate(self.pending) if len(self.pending) > 1 else self.pending[0]
        rows, rest = band[:n], band[n:]
        self.pending = [rest] if rest.shape[0] else []
        self.n_pending = rest.shape[0]
        if self.pixels is not None:
            self.pixels[self.rows_done : self.rows_done + n] = rows
        for data in _encode_tile_row(rows, self.tile, self.quality):
            self.tiles.append((self.spool.tell(), len(data)))
            self.spool.write(data)
        self.rows_done += n

    def finish(self) -> None:
        if self.n_pending:
            self._flush(self.n_pending)
        if self.rows_done != self.height:
            raise RuntimeError(
                f"pyramid level {self.width}×{self.height} got {self.rows_done} rows (internal error)"
            )
        if self.next is not None:
            self.next.finish()

    def iter_tiles(self) -> Iterator[bytes]:
        for offset, length in self.tiles:
            self.spool.seek(offset)
            yield self.spool.read(length)


def _fmt_num(v: float) -> str:
    return str(int(v)) if float(v).is_integer() else f"{v:.6g}"


def _label_image(layout: Layout, name: str) -> U8:
    img = Image.new("RGB", (480, 480), (248, 248, 244))
    draw = ImageDraw.Draw(img)
    lines = ["wsi-screen", "SYNTHETIC", name[:24], f"seed {layout.seed}", layout.preparation]
    for i, line in enumerate(lines):
        draw.text((24, 24 + 40 * i), line, fill=(20, 20, 20))
    draw.rectangle((24, 300, 456, 440), outline=(20, 20, 20), width=3)
    return np.asarray(img, dtype=np.uint8)


def _macro_image(thumb: U8, label: U8) -> U8:
    macro = Image.new("RGB", (1200, 400), (236, 236, 232))
    macro.paste(Image.fromarray(label).resize((360, 360)), (20, 20))
    th = Image.fromarray(thumb)
    scale = min(760 / th.width, 360 / th.height)
    th = th.resize((max(1, int(th.width * scale)), max(1, int(th.height * scale))))
    macro.paste(th, (410 + (760 - th.width) // 2, 20 + (360 - th.height) // 2))
    return np.asarray(macro, dtype=np.uint8)


def write_slide(
    layout: Layout,
    path: str | os.PathLike[str],
    *,
    fmt: SlideFormat | None = None,
    tile_size: int = 512,
    quality: int = 90,
    level_factor: int = 4,
    smallest_level_px: int = 1024,
    workers: int | None = None,
    strip_rows: int | None = None,
    bigtiff: bool | None = None,
) -> WriteStats:
    """Render ``layout`` and write it as a pyramidal TIFF (``fmt="tiff"``) or Aperio SVS.

    Args:
        fmt: ``"tiff"`` or ``"svs"``; default from the file suffix (``.svs`` → svs).
        tile_size: tile side in px (multiple of 16; 256 or 512 are usual).
        quality: JPEG quality (1–100).
        level_factor: downsample between pyramid levels (2 or 4).
        smallest_level_px: stop adding levels once the largest side is at most this.
        workers: processes rendering strips (default: CPU count, 1 for small slides). With more
            than one, the calling script needs the usual ``if __name__ == "__main__":`` guard
            (worker processes are spawned).
        strip_rows: level-0 rows rendered per task (a multiple of ``tile_size``; default: about
            40 Mpx per strip). Memory grows with it.
        bigtiff: force BigTIFF on/off (default: only when the raw image exceeds 2 GiB).
    """
    t_start = time.perf_counter()
    out = Path(path)
    if fmt is None:
        fmt = "svs" if out.suffix.lower() == ".svs" else "tiff"
    if fmt not in ("tiff", "svs"):
        raise ValueError(f"fmt must be 'tiff' or 'svs', got {fmt!r}")
    if tile_size < 16 or tile_size % 16:
        raise ValueError(f"tile_size must be a positive multiple of 16, got {tile_size}")
    if not 1 <= quality <= 100:
        raise ValueError(f"quality must be in 1..100, got {quality}")
    w, h = layout.width, layout.height
    dims = pyramid_dimensions(w, h, level_factor=level_factor, smallest_level_px=smallest_level_px)
    if strip_rows is not None:
        if strip_rows <= 0 or strip_rows % tile_size:
            raise ValueError(f"strip_rows must be a positive multiple of {tile_size}, got {strip_rows}")
        strip_h = strip_rows
    else:
        bands = max(1, _STRIP_TARGET_PX // (w * tile_size))
        strip_h = tile_size * min(bands, max(1, math.ceil(h / tile_size)))
    plan = _StripPlan(w, h, strip_h, tile_size, quality, level_factor)
    n_workers = max(1, min(workers if workers is not None else (os.cpu_count() or 1), plan.n_strips))
    if workers is None and w * h < 16_000_000 and strip_rows is None:
        n_workers = 1  # a pool costs more than it saves on small slides
    if bigtiff is None:
        bigtiff = w * h * 3 > 2**31
    with tempfile.TemporaryFile(dir=out.parent, prefix=".synth-spool-") as spool:
        timings = _write_pyramid(
            layout, out, spool, fmt=fmt, dims=dims, plan=plan, n_workers=n_workers, bigtiff=bigtiff
        )
    timings["write_total_s"] = time.perf_counter() - t_start
    size = out.stat().st_size
    logger.info(
        "wrote %s: %d×%d px, %d levels, %d strips on %d worker(s), %.1f MB in %.1f s",
        out,
        w,
        h,
        len(dims),
        plan.n_strips,
        n_workers,
        size / 1e6,
        timings["write_total_s"],
    )
    return WriteStats(out, dims, plan.n_strips, n_workers, size, timings)


def _write_pyramid(
    layout: Layout,
    out: Path,
    spool: IO[bytes],
    *,
    fmt: SlideFormat,
    dims: tuple[tuple[int, int], ...],
    plan: _StripPlan,
    n_workers: int,
    bigtiff: bool,
) -> dict[str, float]:
    """Render and write every level into ``out`` (via a ``.part`` sibling); return timings."""
    import tifffile

    timings: dict[str, float] = {"render_cpu_s": 0.0, "encode_cpu_s": 0.0}
    w, h, mpp = layout.width, layout.height, layout.mpp
    tile_size, quality, level_factor = plan.tile, plan.quality, plan.factor
    sinks: list[_LevelSink] = []
    nxt: _LevelSink | None = None
    for i in range(len(dims) - 1, 0, -1):
        nxt = _LevelSink(
            dims[i],
            tile=tile_size,
            quality=quality,
            factor=level_factor,
            spool=spool,
            next_sink=nxt,
            keep_pixels=(i == len(dims) - 1),
        )
        sinks.insert(0, nxt)
    small_strips: list[U8] = []  # level-0 ÷ factor, kept only for a one-level SVS thumbnail

    def consume(result: tuple[list[bytes], U8, float, float]) -> Iterator[bytes]:
        tiles, small, t_render, t_encode = result
        timings["render_cpu_s"] += t_render
        timings["encode_cpu_s"] += t_encode
        # Before yielding: the writer stops iterating right after the last tile it needs.
        if sinks:
            sinks[0].push(small)
        elif fmt == "svs":
            small_strips.append(small)
        yield from tiles

    def level0_tiles() -> Generator[bytes, None, None]:
        if n_workers == 1:
            job = _StripJob(layout, plan)
            for i in range(plan.n_strips):
                yield from consume(job.run(i))
            return
        ctx = get_context("spawn")
        with ProcessPoolExecutor(
            n_workers, mp_context=ctx, initializer=_init_worker, initargs=(layout, plan)
        ) as pool:
            queue: deque[Future[tuple[list[bytes], U8, float, float]]] = deque()
            submitted = 0
            while submitted < min(plan.n_strips, 2 * n_workers):
                queue.append(pool.submit(_run_strip, submitted))
                submitted += 1
            while queue:
                result = queue.popleft().result()
                if submitted < plan.n_strips:
                    queue.append(pool.submit(_run_strip, submitted))
                    submitted += 1
                yield from consume(result)

    common: dict[str, Any] = {
        "dtype": np.uint8,
        "tile": (tile_size, tile_size),
        "photometric": "rgb",
        "compression": "jpeg",
        "compressionargs": {"outcolorspace": "RGB"},
        "subsampling": (1, 1),
        "metadata": None,
        "software": "wsi-screen synth",
    }

    def resolution(level: int) -> dict[str, Any]:
        lw, lh = dims[level]
        return {
            "resolution": (1e4 / (mpp * w / lw), 1e4 / (mpp * h / lh)),
            "resolutionunit": "CENTIMETER",
        }

    app_mag = 10.0 / mpp
    aperio_tail = (
        f"|AppMag = {_fmt_num(app_mag)}|MPP = {mpp:.6g}|Filename = {out.stem}"
        f"|Title = wsi-screen synthetic slide|Seed = {layout.seed}"
    )
    tmp = out.with_name(out.name + ".part")
    t0 = time.perf_counter()
    try:
        with tifffile.TiffWriter(tmp, bigtiff=bigtiff) as tif:
            if fmt == "svs":
                desc0 = (
                    f"{_APERIO_HEAD}{w}x{h} [0,0 {w}x{h}] ({tile_size}x{tile_size}) "
                    f"JPEG/RGB Q={quality}{aperio_tail}"
                )
            else:
                desc0 = (
                    f"wsi-screen synthetic slide; seed={layout.seed}; mpp={mpp:.6g}; "
                    f"preparation={layout.preparation}; stain={layout.stain.name}"
                )
            tiles0 = level0_tiles()
            try:
                tif.write(tiles0, shape=(h, w, 3), description=desc0, **resolution(0), **common)
            finally:
                tiles0.close()  # shuts the process pool down
            t1 = time.perf_counter()
            timings["level0_s"] = t1 - t0
            if sinks:
                sinks[0].finish()
            thumb: U8 | None = None
            if fmt == "svs":
                thumb = _thumbnail(sinks, small_strips, layout)
                tif.write(
                    thumb,
                    photometric="rgb",
                    compression="jpeg",
                    compressionargs={"level": quality, "outcolorspace": "RGB"},
                    subsampling=(1, 1),
                    metadata=None,
                    software="wsi-screen synth",
                    description=f"{_APERIO_HEAD}{w}x{h} -> {thumb.shape[1]}x{thumb.shape[0]} - {aperio_tail}",
                )
            for level, sink in enumerate(sinks, start=1):
                lw, lh = dims[level]
                kwargs: dict[str, Any] = {}
                if fmt == "svs":
                    kwargs["description"] = (
                        f"{_APERIO_HEAD}{w}x{h} [0,0 {w}x{h}] ({tile_size}x{tile_size}) -> "
                        f"{lw}x{lh} JPEG/RGB Q={quality}"
                    )
                else:
                    kwargs["subfiletype"] = 1  # reduced-resolution image
                tif.write(sink.iter_tiles(), shape=(lh, lw, 3), **resolution(level), **kwargs, **common)
            if fmt == "svs":
                assert thumb is not None
                label = _label_image(layout, out.stem)
                tif.write(
                    label,
                    photometric="rgb",
                    compression="lzw",
                    metadata=None,
                    subfiletype=1,
                    software="wsi-screen synth",
                    description=f"{_APERIO_HEAD}label {label.shape[1]}x{label.shape[0]}",
                )
                macro = _macro_image(thumb, label)
                tif.write(
                    macro,
                    photometric="rgb",
                    compression="jpeg",
                    compressionargs={"level": 90},
                    metadata=None,
                    subfiletype=9,
                    software="wsi-screen synth",
                    description=f"{_APERIO_HEAD}macro {macro.shape[1]}x{macro.shape[0]}",
                )
            timings["pyramid_s"] = time.perf_counter() - t1
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return timings


def _thumbnail(sinks: list[_LevelSink], small_strips: list[U8], layout: Layout) -> U8:
    """SVS thumbnail (largest side ≤ 1024 px) from the smallest pyramid level."""
    if sinks and sinks[-1].pixels is not None:
        src = sinks[-1].pixels
    elif small_strips and all(s.size for s in small_strips):
        src = np.concatenate(small_strips)
    else:
        src = Renderer(layout).render(0, 0, layout.width, layout.height)
    img = Image.fromarray(src)
    scale = min(1.0, _THUMBNAIL_MAX / max(img.width, img.height))
    if scale < 1.0:
        img = img.resize(
            (max(1, round(img.width * scale)), max(1, round(img.height * scale))),
            Image.Resampling.BOX,
        )
    return np.asarray(img, dtype=np.uint8)
