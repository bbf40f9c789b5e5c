"""Whole-slide access: one typed reader over OpenSlide (default) and tiffslide.

>>> with open_slide("slide.svs") as slide:
...     tile = slide.read_region((1000, 2000), (1024, 1024), mpp=0.25)

Coordinates are level-0 pixels of the slide (what QuPath uses). ``read_region`` takes the wanted
resolution in µm/px, picks the finest pyramid level that is at least as coarse as needed for it and
resamples (antialiased) to the exact output size. Every failure is one of the exception types of
:mod:`wsi_screen.errors`, with a one-line message.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import struct
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol, cast, get_args

import numpy as np
from numpy.typing import NDArray
from PIL import Image

from wsi_screen.errors import (
    CorruptSlideError,
    CorruptTileError,
    MissingMppError,
    SlideNotFoundError,
    SlideTooLargeError,
    UnsupportedSlideError,
    WsiScreenError,
    one_line,
)
from wsi_screen.jpeg_decode import PHOTOMETRIC_RGB, PHOTOMETRIC_YCBCR

__all__ = [
    "BACKENDS",
    "MPP_PLAUSIBLE_RANGE",
    "Backend",
    "MppStatus",
    "RegionParts",
    "Slide",
    "SlideInfo",
    "open_slide",
    "resolve_slide_path",
]

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

Backend = Literal["openslide", "tiffslide"]
BACKENDS: tuple[str, ...] = get_args(Backend)
#: Whether a slide's µm/px is usable (see :attr:`SlideInfo.mpp_status`).
MppStatus = Literal["ok", "implausible", "missing"]

#: µm/px outside this range cannot come from a microscope scan (e.g. TIFF's default 72 dpi → 352.8).
MPP_PLAUSIBLE_RANGE = (0.02, 50.0)
#: Largest accepted level-0 side in pixels; real slides stay below ~300,000.
DEFAULT_MAX_DIMENSION = 1_000_000
#: Default OpenSlide tile-cache size per handle (bytes): a row of 1024-px tiles of a 100k-px-wide slide.
DEFAULT_CACHE_BYTES = 256 * 1024 * 1024
_WHITE = 255


@dataclass(frozen=True)
class SlideInfo:
    """Metadata of an opened slide (all sizes in level-0 pixels unless stated)."""

    path: str
    backend: str
    vendor: str | None
    dimensions: tuple[int, int]
    level_count: int
    level_dimensions: tuple[tuple[int, int], ...]
    level_downsamples: tuple[float, ...]
    mpp_x: float | None
    mpp_y: float | None
    mpp_source: Literal["metadata", "override"]
    objective_power: float | None
    associated_images: tuple[str, ...]
    properties: dict[str, str] = field(repr=False, compare=False)
    #: ``ok``; or, only for a slide opened with ``require_mpp=False``: ``implausible`` (``mpp_x`` and
    #: ``mpp_y`` hold the stated value) or ``missing`` (they are None).
    mpp_status: MppStatus = "ok"
    #: Why the µm/px cannot be used (the error :attr:`mpp` raises); None when ``mpp_status`` is ok.
    mpp_problem: str | None = field(default=None, compare=False)

    @property
    def mpp_plausible(self) -> bool:
        """Whether the µm/px is usable (stated plausibly or overridden)."""
        return self.mpp_status == "ok"

    def _usable_mpp(self) -> tuple[float, float]:
        if self.mpp_status != "ok" or self.mpp_x is None or self.mpp_y is None:
            raise MissingMppError(self.mpp_problem or f"{Path(self.path).name} has no usable µm/px")
        return self.mpp_x, self.mpp_y

    @property
    def mpp(self) -> float:
        """Isotropic µm/px (mean of x and y); MissingMppError when it is implausible or missing."""
        mpp_x, mpp_y = self._usable_mpp()
        return (mpp_x + mpp_y) / 2.0

    @property
    def size_um(self) -> tuple[float, float]:
        """Physical size of level 0 in µm; MissingMppError when the µm/px is implausible or missing."""
        mpp_x, mpp_y = self._usable_mpp()
        return self.dimensions[0] * mpp_x, self.dimensions[1] * mpp_y

    def to_dict(self, *, with_properties: bool = False) -> dict[str, Any]:
        """JSON-serialisable view (``wsi-screen inspect --json``); ``mpp`` is None when unusable."""
        out = asdict(self)
        out["mpp"] = self.mpp if self.mpp_plausible else None
        out["mpp_plausible"] = self.mpp_plausible
        if not with_properties:
            out.pop("properties")
        return out


class _Handle(Protocol):
    """The subset of the OpenSlide API both backends provide."""

    @property
    def dimensions(self) -> tuple[int, int]: ...
    @property
    def level_count(self) -> int: ...
    @property
    def level_dimensions(self) -> Sequence[tuple[int, int]]: ...
    @property
    def level_downsamples(self) -> Sequence[float]: ...
    @property
    def properties(self) -> Any: ...
    @property
    def associated_images(self) -> Any: ...
    def read_region(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> Any: ...
    def close(self) -> None: ...


def resolve_slide_path(path: str | os.PathLike[str]) -> Path:
    """Return the file to open for ``path``; a DICOM series folder resolves to one of its files.

    Raises:
        SlideNotFoundError: the path does not exist.
        UnsupportedSlideError: a folder that is not a DICOM series (e.g. a MIRAX companion folder).
    """
    p = Path(path)
    if not p.exists():
        raise SlideNotFoundError(f"slide not found: {p} (check the path)")
    if p.is_dir():
        dcm = sorted(q for q in p.iterdir() if q.suffix.lower() == ".dcm" and q.is_file())
        if dcm:
            return dcm[0]
        raise UnsupportedSlideError(
            f"{p} is a folder, not a slide (a DICOM series folder must contain .dcm files; "
            "a MIRAX .mrxs file is opened directly, not its companion folder)"
        )
    return p


def _tiff_header(path: Path) -> tuple[str, int] | None:
    """Return (byte order, first IFD offset) if ``path`` starts like a (Big)TIFF, else None."""
    try:
        with path.open("rb") as fh:
            head = fh.read(16)
    except OSError:
        return None
    if len(head) < 8 or head[:2] not in (b"II", b"MM"):
        return None
    order = "<" if head[:2] == b"II" else ">"
    (magic,) = struct.unpack(order + "H", head[2:4])
    if magic == 42:
        (offset,) = struct.unpack(order + "I", head[4:8])
        return order, offset
    if magic == 43 and len(head) >= 16:
        (offset,) = struct.unpack(order + "Q", head[8:16])
        return order, offset
    return None


def _check_tiff_integrity(path: Path) -> None:
    """Raise CorruptSlideError when a TIFF-based slide is truncated (cheap: reads directories only)."""
    header = _tiff_header(path)
    if header is None:
        return
    size = path.stat().st_size
    if header[1] >= size:
        raise CorruptSlideError(
            f"{path.name} is truncated or corrupt: its first TIFF directory (byte {header[1]}) lies "
            f"beyond the end of the file ({size} bytes); copy the slide again from the scanner"
        )
    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            end = 0
            for page in tif.pages:
                page = cast("tifffile.TiffPage", page)
                offsets, counts = page.dataoffsets, page.databytecounts
                if len(offsets):
                    end = max(end, max(o + c for o, c in zip(offsets, counts, strict=False)))
    except Exception as exc:  # tifffile raises many types for damaged files
        raise CorruptSlideError(f"{path.name} has a damaged TIFF structure: {one_line(exc)}") from exc
    if end > size:
        raise CorruptSlideError(
            f"{path.name} is truncated: image data extends to byte {end} but the file has {size} "
            "bytes; copy the slide again from the scanner"
        )


def _open_openslide(path: Path) -> _Handle:
    import openslide

    vendor = openslide.OpenSlide.detect_format(str(path))
    if vendor is None:
        _check_tiff_integrity(path)
        hint = ""
        if _tiff_header(path) is not None:
            hint = "; a flat (untiled) TIFF can be read with slide.backend tiffslide"
        raise UnsupportedSlideError(f"{path.name} is not a whole-slide image OpenSlide can read{hint}")
    try:
        return cast(_Handle, openslide.OpenSlide(str(path)))
    except openslide.OpenSlideUnsupportedFormatError as exc:
        raise UnsupportedSlideError(f"{path.name}: unsupported slide format ({one_line(exc)})") from exc
    except openslide.OpenSlideError as exc:
        msg = one_line(exc)
        if "nsupported" in msg:
            raise UnsupportedSlideError(f"{path.name}: unsupported slide ({msg})") from exc
        _check_tiff_integrity(path)
        raise CorruptSlideError(f"{path.name} is corrupt and cannot be opened ({msg})") from exc


def _open_tiffslide(path: Path) -> _Handle:
    import tiffslide

    if _tiff_header(path) is None:
        raise UnsupportedSlideError(
            f"{path.name} is not a TIFF file, and tiffslide reads only TIFF-based slides; "
            "use slide.backend openslide (DICOM, MIRAX, ...)"
        )
    _check_tiff_integrity(path)
    try:
        return cast(_Handle, tiffslide.TiffSlide(str(path)))
    except Exception as exc:  # tifffile/tiffslide raise many types for damaged files
        raise CorruptSlideError(f"{path.name} cannot be opened by tiffslide ({one_line(exc)})") from exc


def _parse_float(value: object) -> float | None:
    try:
        out = float(str(value))
    except (TypeError, ValueError):
        return None
    return out if math.isfinite(out) else None


# -- direct TIFF tile reading ---------------------------------------------------------------------

#: TIFF compressions the direct path decodes itself (none, JPEG: libjpeg-turbo via imagecodecs).
_JPEG_COMPRESSION = 7
_DIRECT_COMPRESSIONS = frozenset({1, _JPEG_COMPRESSION})


class _TileCache:
    """Thread-safe LRU cache of decoded tiles, bounded in bytes, shared by every handle of a slide.

    A tile that one thread is decoding is awaited by the others rather than decoded twice, so
    neighbouring read windows (which overlap by their halos) cost one decode per tile. A tile is
    claimed only when its decode starts, so a thread waits only for decodes already under way.
    """

    def __init__(self, capacity_bytes: int) -> None:
        self.capacity = max(0, int(capacity_bytes))
        self._lock = threading.Lock()
        self._items: OrderedDict[tuple[int, int], NDArray[np.uint8]] = OrderedDict()
        self._pending: dict[tuple[int, int], threading.Event] = {}
        self._bytes = 0
        self.hits = 0
        self.misses = 0

    def lookup(
        self, keys: Sequence[tuple[int, int]]
    ) -> tuple[list[tuple[int, NDArray[np.uint8]]], list[int]]:
        """One locked pass over ``keys``: (position, tile) of the cached ones, positions of the rest."""
        found: list[tuple[int, NDArray[np.uint8]]] = []
        missing: list[int] = []
        with self._lock:
            for i, key in enumerate(keys):
                arr = self._items.get(key)
                if arr is None:
                    missing.append(i)
                else:
                    self._items.move_to_end(key)
                    self.hits += 1
                    found.append((i, arr))
        return found, missing

    def acquire(self, key: tuple[int, int]) -> NDArray[np.uint8] | threading.Event | None:
        """The cached tile, the event of another thread's decode of it, or None: the caller now
        owns it and must load it and then :meth:`fulfil` it."""
        with self._lock:
            arr = self._items.get(key)
            if arr is not None:
                self._items.move_to_end(key)
                self.hits += 1
                return arr
            event = self._pending.get(key)
            if event is not None:
                return event
            self._pending[key] = threading.Event()
            self.misses += 1
            return None

    def fulfil(self, key: tuple[int, int], arr: NDArray[np.uint8] | None) -> None:
        """Store an acquired tile (None: its load failed) and wake the threads waiting for it."""
        with self._lock:
            event = self._pending.pop(key)
            if arr is not None and arr.nbytes <= self.capacity:
                self._items[key] = arr
                self._bytes += arr.nbytes
                while self._bytes > self.capacity:
                    _, old = self._items.popitem(last=False)
                    self._bytes -= old.nbytes
        event.set()

    def get(self, key: tuple[int, int], load: Callable[[], NDArray[np.uint8]]) -> NDArray[np.uint8]:
        """The cached tile, else ``load()`` it (or wait while another thread loads it)."""
        while True:
            got = self.acquire(key)
            if isinstance(got, threading.Event):
                got.wait()
                continue  # cached now, or its loader failed (then this thread tries, and raises)
            if got is not None:
                return got
            arr = None
            try:
                arr = load()
            finally:
                self.fulfil(key, arr)
            return arr


@dataclass(frozen=True)
class _DirectLevel:
    """Where one pyramid level's tiles lie in the file, and how to decode them."""

    width: int
    height: int
    tile_w: int
    tile_h: int
    tiles_across: int
    offsets: NDArray[np.int64]
    counts: NDArray[np.int64]
    jpegtables: bytes | None
    compression: int
    photometric: int
    decode: Callable[..., Any] = field(repr=False)


class _DirectTiff:
    """Pixels of tiled 8-bit RGB TIFF levels read straight from the file (pread + decode).

    OpenSlide paints each region through cairo into premultiplied ARGB and tiffslide decodes every
    tile a region touches on each call; for the reader's overlapping windows both cost several
    times the JPEG decode itself. Here each tile is decoded once (libjpeg-turbo, GIL released),
    kept in a :class:`_TileCache` shared by every handle of the slide, and copied into the output.
    Shared by :meth:`Slide.reopen` handles (reference counted; ``os.pread`` is thread-safe).
    """

    def __init__(self, path: Path, levels: dict[int, _DirectLevel], cache_bytes: int) -> None:
        self.path = path
        self.levels = levels
        self.cache = _TileCache(cache_bytes)
        self._fd = os.open(path, os.O_RDONLY | getattr(os, "O_BINARY", 0))
        self._refs = 1
        self._lock = threading.Lock()
        #: Where JPEG tiles are decoded in batches (:meth:`Slide.set_jpeg_device`); None: one by one
        #: with libjpeg-turbo on the reading thread.
        self.jpeg_device: torch.device | None = None

    @classmethod
    def probe(
        cls, path: Path, level_dimensions: Sequence[tuple[int, int]], cache_bytes: int
    ) -> _DirectTiff | None:
        """The direct reader for the levels of ``path`` it can serve (None: no level qualifies)."""
        if _tiff_header(path) is None:
            return None
        import tifffile

        levels: dict[int, _DirectLevel] = {}
        try:
            size = path.stat().st_size
            with tifffile.TiffFile(path) as tif:
                pages = [cast("tifffile.TiffPage", p) for p in tif.pages]
                for i, (w, h) in enumerate(level_dimensions):
                    found = [
                        p for p in pages if p.is_tiled and (int(p.imagewidth), int(p.imagelength)) == (w, h)
                    ]
                    if len(found) != 1 or not _direct_eligible(found[0], size):
                        continue
                    p = found[0]
                    levels[i] = _DirectLevel(
                        width=w,
                        height=h,
                        tile_w=int(p.tilewidth),
                        tile_h=int(p.tilelength),
                        tiles_across=math.ceil(w / int(p.tilewidth)),
                        offsets=np.asarray(p.dataoffsets, np.int64),
                        counts=np.asarray(p.databytecounts, np.int64),
                        jpegtables=p.jpegtables,
                        decode=p.decode,
                        compression=int(p.compression),
                        photometric=int(p.photometric),
                    )
        except Exception as exc:  # tifffile raises many types; the backend then reads everything
            logger.debug("direct TIFF reading unavailable for %s: %s", path.name, one_line(exc))
            return None
        return cls(path, levels, cache_bytes) if levels else None

    def share(self) -> _DirectTiff:
        with self._lock:
            if self._refs <= 0:
                raise ValueError(f"slide {self.path.name} is closed")
            self._refs += 1
        return self

    def release(self) -> None:
        with self._lock:
            self._refs -= 1
            if self._refs == 0:
                os.close(self._fd)

    def read_into(self, level: int, x0: int, y0: int, out: NDArray[np.uint8]) -> None:
        """Fill ``out`` (h, w, 3) with the pixels of ``level`` from (x0, y0) (level px, inside)."""
        h, w = out.shape[:2]
        self.visit(level, x0, y0, w, h, lambda tile, tx, ty: _paste(out, x0, y0, tile, tx, ty))

    def visit(
        self, level: int, x0: int, y0: int, w: int, h: int, use: Callable[[NDArray[np.uint8], int, int], None]
    ) -> None:
        """Call ``use(tile, tx, ty)`` for each decoded tile under the region (level px, inside the
        level), as soon as it is available; (tx, ty) is the tile's top-left corner in level px."""
        lv = self.levels[level]
        tw, th = lv.tile_w, lv.tile_h
        rows = range(y0 // th, (y0 + h - 1) // th + 1)
        cols = range(x0 // tw, (x0 + w - 1) // tw + 1)
        places = [(r * lv.tiles_across + c, c * tw, r * th) for r in rows for c in cols]
        keys = [(level, idx) for idx, _, _ in places]
        # Use what is cached, decode (claiming each tile as its decode starts) what nobody is
        # decoding, and only then wait for the tiles other threads are decoding. Last tiles first:
        # in row-major order a window's first tiles are the last ones of its left neighbour, which
        # another thread is likely reading at the same time and (going last-first too) decodes first.
        found, missing = self.cache.lookup(keys)
        for i, tile in found:
            use(tile, places[i][1], places[i][2])
        busy: list[int] = []
        batch = self.jpeg_device is not None and lv.compression == _JPEG_COMPRESSION
        claimed: list[int] = []
        for i in reversed(missing):
            got = self.cache.acquire(keys[i])
            if isinstance(got, threading.Event):
                busy.append(i)
                continue
            if got is None:
                if batch:  # decoded below, all of them in one call
                    claimed.append(i)
                    continue
                try:
                    got = self._decode(lv, places[i][0])
                finally:
                    self.cache.fulfil(keys[i], got)
            use(got, places[i][1], places[i][2])
        if claimed:
            decoded: list[NDArray[np.uint8] | None] = [None] * len(claimed)
            try:
                decoded = list(self._decode_batch(lv, [places[i][0] for i in claimed]))
            finally:  # on an error every claimed tile is released (its waiters decode it themselves)
                for i, arr in zip(claimed, decoded, strict=True):
                    self.cache.fulfil(keys[i], arr)
            for i, arr in zip(claimed, decoded, strict=True):
                use(cast("NDArray[np.uint8]", arr), places[i][1], places[i][2])
        for i in busy:
            tile = self.cache.get(keys[i], partial(self._decode, lv, places[i][0]))
            use(tile, places[i][1], places[i][2])

    def raw_tile(self, lv: _DirectLevel, idx: int) -> bytes | None:
        """The tile's bytes as stored (None: a tile the scanner never wrote)."""
        n, off = int(lv.counts[idx]), int(lv.offsets[idx])
        if n == 0:
            return None
        data = os.pread(self._fd, n, off)
        if len(data) != n:
            raise CorruptTileError(f"tile {idx}: {len(data)} of {n} bytes present (truncated file)")
        return data

    def tile_streams(self, lv: _DirectLevel, indices: Sequence[int]) -> list[bytes | None]:
        """Self-contained JPEG streams of tiles of a JPEG level (None: a tile never written)."""
        from wsi_screen.jpeg_decode import tile_stream

        out: list[bytes | None] = []
        for idx in indices:
            data = self.raw_tile(lv, int(idx))
            out.append(None if data is None else tile_stream(data, lv.jpegtables, photometric=lv.photometric))
        return out

    def _decode_batch(self, lv: _DirectLevel, indices: Sequence[int]) -> list[NDArray[np.uint8]]:
        """Decode JPEG tiles in one call on :attr:`jpeg_device` (nvJPEG on CUDA); a batch the
        device decoder rejects is decoded again tile by tile on the CPU, which names a bad tile."""
        from wsi_screen.jpeg_decode import decode_streams

        device = cast("torch.device", self.jpeg_device)  # visit() batches only when it is set
        streams = self.tile_streams(lv, indices)
        try:
            host = decode_streams(streams, device=device, tile_size=(lv.tile_w, lv.tile_h)).cpu().numpy()
        except (RuntimeError, ValueError) as exc:
            logger.debug("device decode failed (%s): %d tiles to the CPU", one_line(exc), len(indices))
            return [self._decode(lv, idx) for idx in indices]
        # One array per tile, so that the cache frees each tile's memory when it evicts it.
        return [np.array(host[k]) for k in range(len(indices))]

    def _decode(self, lv: _DirectLevel, idx: int) -> NDArray[np.uint8]:
        data = self.raw_tile(lv, idx)
        if data is None:  # a tile the scanner never wrote: empty glass
            return np.full((lv.tile_h, lv.tile_w, 3), _WHITE, np.uint8)
        arr = np.asarray(lv.decode(data, idx, jpegtables=lv.jpegtables)[0])
        if arr.ndim == 4:
            arr = arr[0]
        if arr.shape[2] != 3 or arr.dtype != np.uint8:
            raise CorruptTileError(f"tile {idx} decoded to {arr.shape} {arr.dtype}, not RGB")
        if arr.shape[0] < lv.tile_h or arr.shape[1] < lv.tile_w:
            full = np.full((lv.tile_h, lv.tile_w, 3), _WHITE, np.uint8)
            full[: arr.shape[0], : arr.shape[1]] = arr
            arr = full
        return arr


def _paste(out: NDArray[np.uint8], x0: int, y0: int, tile: NDArray[np.uint8], tx: int, ty: int) -> None:
    """Copy the part of ``tile`` (top-left at level px tx, ty) that overlaps ``out`` (at x0, y0)."""
    h, w = out.shape[:2]
    th, tw = tile.shape[:2]
    ax0, ax1 = max(x0, tx), min(x0 + w, tx + tw)
    ay0, ay1 = max(y0, ty), min(y0 + h, ty + th)
    out[ay0 - y0 : ay1 - y0, ax0 - x0 : ax1 - x0] = tile[ay0 - ty : ay1 - ty, ax0 - tx : ax1 - tx]


def _direct_eligible(page: Any, file_size: int) -> bool:
    """Whether the direct path reads ``page`` exactly like the backends: tiled, contiguous, 8-bit RGB."""
    counts = np.asarray(page.databytecounts, np.int64)
    offsets = np.asarray(page.dataoffsets, np.int64)
    n_across = math.ceil(int(page.imagewidth) / int(page.tilewidth))
    n_down = math.ceil(int(page.imagelength) / int(page.tilelength))
    return bool(
        int(page.compression) in _DIRECT_COMPRESSIONS
        and int(page.photometric) in (PHOTOMETRIC_RGB, PHOTOMETRIC_YCBCR)
        and int(page.samplesperpixel) == 3
        and int(page.bitspersample) == 8
        and int(page.planarconfig) == 1
        and int(getattr(page, "imagedepth", 1)) == 1
        and not page.extrasamples
        and len(offsets) == n_across * n_down
        and (len(offsets) == 0 or int((offsets + counts).max()) <= file_size)
    )


@dataclass(frozen=True, eq=False)
class RegionParts:
    """A region's pixels as the arrays they are pasted from, not yet copied into one array.

    What :meth:`Slide.read_region_parts` returns: on the direct TIFF path the decoded tiles under
    the region (shared with the tile cache: read-only), otherwise one array read for the region.
    Nothing is copied until :meth:`paste_into`, so a consumer can paste straight into its own
    buffer, e.g. one slot of a batch, instead of copying the tiles into a window and the window
    into the batch. Each piece is ``(array, x, y)``: the array's top-left corner at region px
    (x, y), possibly outside the region (only the overlap is pasted). Pixels that no piece covers
    are white glass.
    """

    width: int
    height: int
    pieces: tuple[tuple[NDArray[np.uint8], int, int], ...]
    covered: bool
    """Whether the pieces cover every pixel of the region (otherwise the rest is white)."""
    owned: bool = False
    """Whether the only piece is an array made for this region alone (:meth:`to_array` returns it)."""

    @classmethod
    def from_array(cls, arr: NDArray[np.uint8]) -> RegionParts:
        """A region that is one H×W×3 array of its own."""
        return cls(int(arr.shape[1]), int(arr.shape[0]), ((arr, 0, 0),), covered=True, owned=True)

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.height, self.width, 3)

    def paste_into(self, out: NDArray[np.uint8]) -> NDArray[np.uint8]:
        """Copy the region into ``out`` (H×W×3 uint8, may be a strided view) and return it."""
        _check_out(out, self.width, self.height)
        if not self.covered:
            out.fill(_WHITE)
        for arr, x, y in self.pieces:
            _paste(out, 0, 0, arr, x, y)
        return out

    def to_array(self) -> NDArray[np.uint8]:
        """The region as one H×W×3 array (its own array when it has one, else a new one)."""
        if self.owned:
            return self.pieces[0][0]
        return self.paste_into(np.empty(self.shape, np.uint8))


class Slide:
    """An opened whole-slide image (context manager).

    Use :func:`open_slide` to create one. A ``Slide`` may be shared between threads for metadata,
    but reader threads should each call :meth:`reopen` for a handle of their own, so that decoding
    runs in parallel.

    Tiled 8-bit RGB TIFF levels (JPEG or uncompressed: generic TIFF, Aperio SVS) are read directly
    from the file when ``direct`` is true (the default): tiles are decoded once with libjpeg-turbo
    and kept in a tile cache of ``cache_bytes`` shared by this slide and its :meth:`reopen` handles.
    Other levels and formats go through the backend, whose tile cache (``cache_bytes``) is per handle:
    a cache shared by OpenSlide handles was measured slower (its lock serialises the reader threads).
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        backend: Backend = "openslide",
        mpp: float | None = None,
        max_dimension: int = DEFAULT_MAX_DIMENSION,
        cache_bytes: int | None = DEFAULT_CACHE_BYTES,
        direct: bool = True,
        require_mpp: bool = True,
        _shared: _DirectTiff | None = None,
    ) -> None:
        if backend not in BACKENDS:
            raise UnsupportedSlideError(
                f"unknown slide backend {backend!r}; choose one of: {', '.join(BACKENDS)}"
            )
        if mpp is not None and not (MPP_PLAUSIBLE_RANGE[0] <= mpp <= MPP_PLAUSIBLE_RANGE[1]):
            raise MissingMppError(
                f"slide.mpp = {mpp} is not a plausible pixel size; give µm per pixel, e.g. 0.25 (40×)"
            )
        self._requested_path = Path(path)
        self.path = resolve_slide_path(path)
        self.backend: Backend = backend
        self._mpp_override = mpp
        self._require_mpp = require_mpp
        self._max_dimension = max_dimension
        self._cache_bytes = cache_bytes
        self._direct_enabled = direct
        self._direct: _DirectTiff | None = _shared
        self._lock = threading.Lock()
        self._handle: _Handle | None = None
        try:
            self._handle = self._open_handle()
            self._probe()
            self.info = self._read_info()
            if direct and self._direct is None:
                self._direct = _DirectTiff.probe(
                    self.path, self.info.level_dimensions, self._cache_bytes or 0
                )
        except BaseException:
            self.close()
            raise

    # -- lifecycle -------------------------------------------------------------------------------
    def _open_handle(self) -> _Handle:
        handle = _open_openslide(self.path) if self.backend == "openslide" else _open_tiffslide(self.path)
        if self.backend == "openslide" and self._cache_bytes:
            import openslide

            if hasattr(openslide, "OpenSlideCache"):
                cast(Any, handle).set_cache(openslide.OpenSlideCache(self._cache_bytes))
        return handle

    def reopen(self) -> Slide:
        """A new handle on the same file with the same settings (sharing the direct tile cache)."""
        return Slide(
            self._requested_path,
            backend=self.backend,
            mpp=self._mpp_override,
            max_dimension=self._max_dimension,
            cache_bytes=self._cache_bytes,
            direct=self._direct_enabled,
            require_mpp=self._require_mpp,
            _shared=self._direct.share() if self._direct is not None else None,
        )

    @property
    def cache_bytes(self) -> int:
        """Capacity of the tile cache shared by this slide and its :meth:`reopen` handles (bytes)."""
        return int(self._cache_bytes or 0)

    def close(self) -> None:
        """Release the file handles (idempotent)."""
        handle, self._handle = self._handle, None
        if handle is not None:
            handle.close()
        direct, self._direct = self._direct, None
        if direct is not None:
            direct.release()

    @property
    def direct_levels(self) -> tuple[int, ...]:
        """Pyramid levels read directly from the TIFF tiles (the rest go through the backend)."""
        return tuple(sorted(self._direct.levels)) if self._direct is not None else ()

    def jpeg_tile_streams(self, level: int, indices: Sequence[int]) -> list[bytes | None]:
        """Self-contained JPEG streams of tiles of a JPEG level read directly from the TIFF.

        ``indices`` count tiles row by row (``row * tiles_across + col``, :meth:`tile_layout`).
        Each stream carries the level's tables and, for RGB-coded tiles, says so
        (:func:`wsi_screen.jpeg_decode.tile_stream`); None is a tile the scanner never wrote.

        Raises:
            ValueError: the level is not read directly, or not JPEG-compressed, or an index is out
                of range.
        """
        lv = self._jpeg_level(level)
        n = len(lv.offsets)
        for idx in indices:
            if not 0 <= int(idx) < n:
                raise ValueError(f"tile index {idx} out of range 0..{n - 1} at level {level}")
        return cast(_DirectTiff, self._direct).tile_streams(lv, indices)  # _jpeg_level checked it is set

    def set_jpeg_device(self, device: torch.device | None) -> None:
        """Decode the JPEG tiles of directly read levels in batches on ``device`` from now on, for
        this slide and every :meth:`reopen` handle (they share the tile cache): nvJPEG on a CUDA
        device (:func:`wsi_screen.jpeg_decode.decode_streams`), torchvision's libjpeg-turbo
        elsewhere. None: one tile at a time with libjpeg-turbo on the reading thread (the default).
        The decoded tiles come back to host memory; levels read through the backend are unchanged.
        """
        if self._direct is not None:
            self._direct.jpeg_device = device

    @property
    def jpeg_device(self) -> torch.device | None:
        """Where JPEG tiles are decoded in batches (:meth:`set_jpeg_device`); None: on the CPU."""
        return self._direct.jpeg_device if self._direct is not None else None

    def tile_layout(self, level: int) -> tuple[int, int, int, int]:
        """(tile width, tile height, tiles across, tiles down) of a level read directly."""
        lv = self._direct_level(level)
        return lv.tile_w, lv.tile_h, lv.tiles_across, math.ceil(lv.height / lv.tile_h)

    def _direct_level(self, level: int) -> _DirectLevel:
        if self._direct is None or level not in self._direct.levels:
            raise ValueError(
                f"{self.path.name}: level {level} is not read directly from TIFF tiles "
                f"(direct levels: {list(self.direct_levels) or 'none'})"
            )
        return self._direct.levels[level]

    def _jpeg_level(self, level: int) -> _DirectLevel:
        lv = self._direct_level(level)
        if lv.compression != _JPEG_COMPRESSION:
            raise ValueError(
                f"{self.path.name}: level {level} is not JPEG-compressed (TIFF compression {lv.compression})"
            )
        return lv

    def cache_stats(self) -> dict[str, int]:
        """Hits and misses (= tile decodes) of the direct tile cache shared by this slide's handles."""
        if self._direct is None:
            return {"hits": 0, "misses": 0}
        return {"hits": self._direct.cache.hits, "misses": self._direct.cache.misses}

    def __enter__(self) -> Slide:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Slide({str(self.path)!r}, backend={self.backend!r})"

    @property
    def _h(self) -> _Handle:
        if self._handle is None:
            raise ValueError(f"slide {self.path.name} is closed")
        return self._handle

    # -- metadata --------------------------------------------------------------------------------
    def _read_info(self) -> SlideInfo:
        h = self._h
        props = {str(k): str(v) for k, v in dict(h.properties).items()}
        prefix = "openslide" if self.backend == "openslide" else "tiffslide"
        width, height = (int(v) for v in h.dimensions)
        if width <= 0 or height <= 0:
            raise CorruptSlideError(f"{self.path.name} reports empty dimensions {width}×{height}")
        if max(width, height) > self._max_dimension:
            raise SlideTooLargeError(
                f"{self.path.name} reports {width}×{height} px, beyond the limit of "
                f"{self._max_dimension} px per side (corrupt metadata?)"
            )
        mpp_x = _parse_float(props.get(f"{prefix}.mpp-x"))
        mpp_y = _parse_float(props.get(f"{prefix}.mpp-y")) or mpp_x
        source: Literal["metadata", "override"] = "metadata"
        if self._mpp_override is not None:
            mpp_x = mpp_y = float(self._mpp_override)
            source = "override"
        status: MppStatus = "ok"
        problem: str | None = None
        if mpp_x is None or mpp_y is None:
            mpp_x = mpp_y = None
            status = "missing"
            problem = (
                f"{self.path.name} has no µm/px metadata; set slide.mpp to the scan's pixel size "
                "(e.g. 0.25 for 40×, 0.5 for 20×)"
            )
        elif not all(MPP_PLAUSIBLE_RANGE[0] <= m <= MPP_PLAUSIBLE_RANGE[1] for m in (mpp_x, mpp_y)):
            bad = mpp_x if not MPP_PLAUSIBLE_RANGE[0] <= mpp_x <= MPP_PLAUSIBLE_RANGE[1] else mpp_y
            status = "implausible"
            problem = (
                f"{self.path.name} states {bad:.4g} µm/px, which no microscope scan has (often a "
                "TIFF default resolution); set slide.mpp to the scan's real pixel size"
            )
        if problem is not None and self._require_mpp:
            raise MissingMppError(problem)
        if mpp_x is not None and mpp_y is not None and abs(mpp_x - mpp_y) > 0.01 * max(mpp_x, mpp_y):
            logger.warning(
                "%s has anisotropic pixels (%.4f × %.4f µm); using their mean", self.path.name, mpp_x, mpp_y
            )
        vendor = props.get(f"{prefix}.vendor") or None
        if self.backend == "tiffslide" and vendor is None and "aperio.AppMag" in props:
            vendor = "aperio"
        return SlideInfo(
            path=str(self.path),
            backend=self.backend,
            vendor=vendor,
            dimensions=(width, height),
            level_count=int(h.level_count),
            level_dimensions=tuple((int(w), int(hh)) for w, hh in h.level_dimensions),
            level_downsamples=tuple(float(d) for d in h.level_downsamples),
            mpp_x=None if mpp_x is None else float(mpp_x),
            mpp_y=None if mpp_y is None else float(mpp_y),
            mpp_source=source,
            objective_power=_parse_float(props.get(f"{prefix}.objective-power")),
            associated_images=tuple(sorted(str(k) for k in h.associated_images)),
            properties=props,
            mpp_status=status,
            mpp_problem=problem,
        )

    def _probe(self) -> None:
        """Decode one pixel of the coarsest level so unsupported codecs fail at open, not mid-run."""
        handle = self._h
        level = int(handle.level_count) - 1
        w, h = handle.level_dimensions[level]
        ds = float(handle.level_downsamples[level])
        self._read_raw((int(w // 2 * ds), int(h // 2 * ds)), level, (1, 1))

    @property
    def dimensions(self) -> tuple[int, int]:
        """Level-0 (width, height) in pixels."""
        return self.info.dimensions

    @property
    def mpp(self) -> float:
        """Level-0 µm/px (isotropic); MissingMppError for a slide opened with ``require_mpp=False``
        whose µm/px is implausible or missing."""
        return self.info.mpp

    @property
    def level_count(self) -> int:
        return self.info.level_count

    @property
    def level_dimensions(self) -> tuple[tuple[int, int], ...]:
        return self.info.level_dimensions

    @property
    def level_downsamples(self) -> tuple[float, ...]:
        return self.info.level_downsamples

    @property
    def vendor(self) -> str | None:
        return self.info.vendor

    @property
    def objective_power(self) -> float | None:
        return self.info.objective_power

    @property
    def associated_image_names(self) -> tuple[str, ...]:
        return self.info.associated_images

    def associated_image(self, name: str) -> NDArray[np.uint8]:
        """An associated image (label, macro, thumbnail, ...) as an RGB array."""
        if name not in self.info.associated_images:
            raise KeyError(
                f"{self.path.name} has no associated image {name!r}; it has: "
                f"{', '.join(self.info.associated_images) or 'none'}"
            )
        img = self._h.associated_images[name]
        return _to_rgb(np.asarray(img))

    def fingerprint(self) -> str:
        """Content fingerprint (sha256 of size, head and tail of every file of the slide)."""
        return slide_fingerprint(self.path)

    # -- pixels ----------------------------------------------------------------------------------
    def best_level(self, mpp: float) -> int:
        """The coarsest level whose resolution is still at least as fine as ``mpp`` µm/px."""
        if mpp <= 0:
            raise ValueError(f"mpp must be positive, got {mpp}")
        want = mpp / self.mpp
        best = 0
        for i, ds in enumerate(self.info.level_downsamples):
            if ds <= want * (1 + 1e-3):
                best = i
        return best

    def read_level(
        self,
        location: tuple[int, int],
        level: int,
        size: tuple[int, int],
        *,
        out: NDArray[np.uint8] | None = None,
    ) -> NDArray[np.uint8]:
        """Raw pixels of ``level`` (H×W×3 uint8); ``location`` in level-0 px; outside = white glass.

        ``out``: an H×W×3 uint8 array to fill and return instead of a new one.
        """
        if not 0 <= level < self.info.level_count:
            raise ValueError(f"level {level} out of range 0..{self.info.level_count - 1}")
        w, h = int(size[0]), int(size[1])
        if w <= 0 or h <= 0:
            raise ValueError(f"region size must be positive, got {w}×{h}")
        _check_out(out, w, h)
        ds = self.info.level_downsamples[level]
        # Clip to the level so both backends agree outside the image (white, like empty glass).
        (lx, ly), (cx0, cy0, cx1, cy1), inside = self._clip_to_level(location, level, w, h)
        if out is None:
            out = np.empty((h, w, 3), np.uint8) if inside else np.full((h, w, 3), _WHITE, dtype=np.uint8)
        elif not inside:
            out.fill(_WHITE)
        if cx1 <= cx0 or cy1 <= cy0:
            return out
        direct = self._direct
        if direct is not None and level in direct.levels:
            try:
                direct.read_into(level, cx0, cy0, out[cy0 - ly : cy1 - ly, cx0 - lx : cx1 - lx])
            except (MemoryError, KeyboardInterrupt):
                raise
            except Exception as exc:
                raise self._tile_error(level, (cx0, cy0, cx1, cy1), exc) from exc
            return out
        loc0 = (round(cx0 * ds), round(cy0 * ds))
        if cx0 == lx and cy0 == ly:
            loc0 = (int(location[0]), int(location[1]))
        region = self._read_raw(loc0, level, (cx1 - cx0, cy1 - cy0))
        out[cy0 - ly : cy1 - ly, cx0 - lx : cx1 - lx] = region
        return out

    def _tile_error(self, level: int, box: tuple[int, int, int, int], exc: BaseException) -> CorruptTileError:
        x0, y0, x1, y1 = box
        return CorruptTileError(
            f"{self.path.name}: corrupt tile data at level {level}, region "
            f"x={x0} y={y0} {x1 - x0}×{y1 - y0} ({one_line(exc)})"
        )

    def _clip_to_level(
        self, location: tuple[int, int], level: int, w: int, h: int
    ) -> tuple[tuple[int, int], tuple[int, int, int, int], bool]:
        """A w×h region of ``level`` at level-0 ``location``: its origin in level px, the part of it
        inside the level (x0, y0, x1, y1; empty when x1 ≤ x0 or y1 ≤ y0), and whether that is all of it."""
        ds = self.info.level_downsamples[level]
        lw, lh = self.info.level_dimensions[level]
        lx, ly = math.floor(location[0] / ds), math.floor(location[1] / ds)
        cx0, cy0 = max(lx, 0), max(ly, 0)
        cx1, cy1 = min(lx + w, lw), min(ly + h, lh)
        inside = cx0 == lx and cy0 == ly and cx1 == lx + w and cy1 == ly + h
        return (lx, ly), (cx0, cy0, cx1, cy1), inside

    def _read_raw(self, loc0: tuple[int, int], level: int, size: tuple[int, int]) -> NDArray[np.uint8]:
        try:
            img = self._h.read_region(loc0, level, size)
        except WsiScreenError:
            raise
        except (MemoryError, KeyboardInterrupt):
            raise
        except Exception as exc:
            msg = one_line(exc)
            self._recover_after_error()
            if "COMPRESSION" in msg or "ompression" in msg:
                raise UnsupportedSlideError(
                    f"{self.path.name} uses an image compression {self.backend} cannot decode ({msg})"
                ) from exc
            raise CorruptTileError(
                f"{self.path.name}: corrupt tile data at level {level}, region "
                f"x={loc0[0]} y={loc0[1]} {size[0]}×{size[1]} ({msg})"
            ) from exc
        return _to_rgb(np.asarray(img))

    def _recover_after_error(self) -> None:
        """OpenSlide errors are sticky: replace the handle so later reads of good tiles still work."""
        if self.backend != "openslide":
            return
        with self._lock:
            try:
                old, self._handle = self._handle, self._open_handle()
            except WsiScreenError:
                return
            if old is not None:
                old.close()

    def read_region(
        self,
        location: tuple[float, float],
        size: tuple[int, int],
        *,
        mpp: float,
        level: int | None = None,
        out: NDArray[np.uint8] | None = None,
    ) -> NDArray[np.uint8]:
        """Pixels of a region at ``mpp`` µm/px.

        Args:
            location: top-left corner in level-0 pixels (may be fractional).
            size: (width, height) of the output in pixels at ``mpp``.
            mpp: wanted resolution in µm/px.
            level: force a pyramid level (default: :meth:`best_level`).
            out: an H×W×3 uint8 array to fill and return instead of a new one.

        Returns:
            H×W×3 uint8 RGB; parts outside the slide are white.
        """
        w, h = int(size[0]), int(size[1])
        if w <= 0 or h <= 0:
            raise ValueError(f"region size must be positive, got {w}×{h}")
        lvl = self.best_level(mpp) if level is None else level
        ds = self.info.level_downsamples[lvl]
        scale = mpp / self.mpp / ds  # level pixels per output pixel
        fx, fy = location[0] / ds, location[1] / ds
        if abs(scale - 1.0) < 1e-6 and float(fx).is_integer() and float(fy).is_integer():
            return self.read_level((int(location[0]), int(location[1])), lvl, (w, h), out=out)
        _check_out(out, w, h)
        # Source window in level pixels, with a margin for the resampling kernel.
        margin = math.ceil(2 * max(scale, 1.0)) + 1
        sx0, sy0 = math.floor(fx) - margin, math.floor(fy) - margin
        sx1 = math.ceil(fx + w * scale) + margin
        sy1 = math.ceil(fy + h * scale) + margin
        src = self.read_level((round(sx0 * ds), round(sy0 * ds)), lvl, (sx1 - sx0, sy1 - sy0))
        box = (fx - sx0, fy - sy0, fx - sx0 + w * scale, fy - sy0 + h * scale)
        img = Image.fromarray(src).resize((w, h), resample=Image.Resampling.BILINEAR, box=box)
        if out is None:
            return np.asarray(img, dtype=np.uint8)
        out[...] = np.asarray(img, dtype=np.uint8)
        return out

    def read_region_parts(
        self,
        location: tuple[float, float],
        size: tuple[int, int],
        *,
        mpp: float,
        level: int | None = None,
    ) -> RegionParts:
        """The pixels :meth:`read_region` would return, as the pieces they are pasted from.

        When the region maps one to one onto the pixels of a level read directly from the TIFF
        tiles (``mpp`` is that level's resolution and ``location`` falls on its pixel grid), the
        pieces are the decoded tiles, and nothing is copied yet; otherwise the region is read with
        :meth:`read_region` and is its only piece. Same arguments and errors as :meth:`read_region`.
        """
        w, h = int(size[0]), int(size[1])
        if w <= 0 or h <= 0:
            raise ValueError(f"region size must be positive, got {w}×{h}")
        lvl = self.best_level(mpp) if level is None else level
        ds = self.info.level_downsamples[lvl]
        fx, fy = location[0] / ds, location[1] / ds
        direct = self._direct
        on_grid = float(fx).is_integer() and float(fy).is_integer()
        one_to_one = abs(mpp / self.mpp / ds - 1.0) < 1e-6 and on_grid
        if direct is None or lvl not in direct.levels or not one_to_one:
            return RegionParts.from_array(self.read_region(location, (w, h), mpp=mpp, level=lvl))
        lw, lh = self.info.level_dimensions[lvl]
        loc = (int(location[0]), int(location[1]))
        (lx, ly), (cx0, cy0, cx1, cy1), covered = self._clip_to_level(loc, lvl, w, h)
        if cx1 <= cx0 or cy1 <= cy0:
            return RegionParts(w, h, (), covered=False)
        pieces: list[tuple[NDArray[np.uint8], int, int]] = []

        def keep(tile: NDArray[np.uint8], tx: int, ty: int) -> None:
            # An edge tile's pixels beyond the level are not image: cut them off (a view).
            pieces.append((tile[: lh - ty, : lw - tx], tx - lx, ty - ly))

        try:
            direct.visit(lvl, cx0, cy0, cx1 - cx0, cy1 - cy0, keep)
        except (MemoryError, KeyboardInterrupt):
            raise
        except Exception as exc:
            raise self._tile_error(lvl, (cx0, cy0, cx1, cy1), exc) from exc
        return RegionParts(w, h, tuple(pieces), covered=covered)

    def thumbnail(self, *, mpp: float, block: int = 1024, workers: int = 1) -> NDArray[np.uint8]:
        """The whole slide at ``mpp`` µm/px, read in ``block``² blocks so memory stays bounded.

        Each block is read from the coarsest level at least as fine as ``mpp`` (:meth:`best_level`;
        through the direct TIFF path where it serves that level). ``workers`` > 1 reads the blocks
        in that many threads, each on its own :meth:`reopen` handle (decoding releases the GIL); the
        pixels are the same for any number of workers.
        """
        if block <= 0:
            raise ValueError(f"block must be positive, got {block}")
        if workers < 1:
            raise ValueError(f"workers must be at least 1, got {workers}")
        w0, h0 = self.dimensions
        scale = mpp / self.mpp
        tw, th = max(1, round(w0 / scale)), max(1, round(h0 / scale))
        out = np.empty((th, tw, 3), dtype=np.uint8)
        blocks = [(x, y) for y in range(0, th, block) for x in range(0, tw, block)]

        def read(src: Slide, x: int, y: int) -> None:
            bw, bh = min(block, tw - x), min(block, th - y)
            src.read_region((x * scale, y * scale), (bw, bh), mpp=mpp, out=out[y : y + bh, x : x + bw])

        if workers == 1 or len(blocks) == 1:
            for x, y in blocks:
                read(self, x, y)
            return out
        from concurrent.futures import ThreadPoolExecutor

        handles = ThreadHandles(self)

        def read_in_thread(xy: tuple[int, int]) -> None:
            read(handles.get(), *xy)

        try:
            with ThreadPoolExecutor(
                max_workers=min(workers, len(blocks)), thread_name_prefix="wsi-thumb"
            ) as ex:
                for _ in ex.map(read_in_thread, blocks):
                    pass
        finally:
            handles.close()
        return out

    def iter_levels(self) -> Iterator[tuple[int, tuple[int, int], float, float]]:
        """(level, dimensions, downsample, µm/px) for each pyramid level."""
        for i, (dims, ds) in enumerate(
            zip(self.info.level_dimensions, self.info.level_downsamples, strict=True)
        ):
            yield i, dims, ds, ds * self.mpp


class ThreadHandles:
    """One :meth:`Slide.reopen` handle of a slide per thread that asks (for reader threads)."""

    def __init__(self, slide: Slide) -> None:
        self._slide = slide
        self._local = threading.local()
        self._handles: list[Slide] = []
        self._lock = threading.Lock()

    def get(self) -> Slide:
        """This thread's handle, opened on first use."""
        h: Slide | None = getattr(self._local, "slide", None)
        if h is None:
            h = self._slide.reopen()
            self._local.slide = h
            with self._lock:
                self._handles.append(h)
        return h

    def close(self) -> None:
        """Close every handle opened so far."""
        with self._lock:
            handles, self._handles = self._handles, []
        for h in handles:
            h.close()


def _check_out(out: NDArray[np.uint8] | None, w: int, h: int) -> None:
    if out is not None and (out.shape != (h, w, 3) or out.dtype != np.uint8):
        raise ValueError(f"out must be a {h}×{w}×3 uint8 array, got {out.shape} {out.dtype}")


def _to_rgb(arr: NDArray[Any]) -> NDArray[np.uint8]:
    """RGB(A)/greyscale array → H×W×3 uint8, compositing transparency onto white."""
    if arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, axis=2)
    if arr.shape[2] == 4:
        rgb = arr[..., :3].astype(np.uint16)
        alpha = arr[..., 3:4].astype(np.uint16)
        # OpenSlide returns premultiplied alpha: out = rgb + (255 - a) * white / 255.
        if np.all(alpha == 255):
            return np.ascontiguousarray(arr[..., :3], dtype=np.uint8)
        out = rgb + ((255 - alpha) * _WHITE + 127) // 255
        clipped: NDArray[np.uint8] = np.clip(out, 0, 255).astype(np.uint8)
        return clipped
    return np.ascontiguousarray(arr[..., :3], dtype=np.uint8)


def slide_fingerprint(path: str | os.PathLike[str], *, chunk: int = 1 << 20) -> str:
    """sha256 over name-independent content: size, first and last MiB of each file of the slide.

    For a DICOM series or MIRAX slide every file in the slide's folder counts, so a changed
    companion file changes the fingerprint.
    """
    p = Path(path)
    files: list[Path]
    if p.is_dir():
        files = sorted(q for q in p.rglob("*") if q.is_file())
    else:
        files = [p]
        companion = p.with_suffix("")
        if p.suffix.lower() == ".mrxs" and companion.is_dir():
            files += sorted(q for q in companion.rglob("*") if q.is_file())
    digest = hashlib.sha256()
    for f in files:
        size = f.stat().st_size
        digest.update(f.name.encode() if f != p else b"")
        digest.update(struct.pack("<Q", size))
        with f.open("rb") as fh:
            digest.update(fh.read(chunk))
            if size > chunk:
                fh.seek(max(chunk, size - chunk))
                digest.update(fh.read(chunk))
    return digest.hexdigest()


def open_slide(
    path: str | os.PathLike[str],
    *,
    backend: Backend = "openslide",
    mpp: float | None = None,
    max_dimension: int = DEFAULT_MAX_DIMENSION,
    require_mpp: bool = True,
) -> Slide:
    """Open a whole-slide image.

    Args:
        path: slide file (or a DICOM series folder).
        backend: ``"openslide"`` (default; every vendor format, DICOM) or ``"tiffslide"``.
        mpp: µm/px to use instead of the metadata (``slide.mpp``).
        max_dimension: refuse slides whose level-0 side is larger (corrupt metadata).
        require_mpp: refuse a slide whose metadata has no plausible µm/px (and no ``mpp`` is given).
            False (``wsi-screen inspect``) opens it anyway: :attr:`SlideInfo.mpp_status` says what is
            wrong, and everything that needs the µm/px (:attr:`Slide.mpp`, reading regions) raises
            MissingMppError.

    Raises:
        SlideNotFoundError, UnsupportedSlideError, CorruptSlideError, CorruptTileError,
        SlideTooLargeError, MissingMppError.
    """
    return Slide(path, backend=backend, mpp=mpp, max_dimension=max_dimension, require_mpp=require_mpp)
