"""JPEG tiles of tiled TIFF levels as complete JPEG streams, decoded in batches on the device.

A tiled TIFF (Aperio SVS, the synthetic writer's pyramids) stores each tile as a JPEG stream that
may be *abbreviated*: its quantization and Huffman tables live once in the level's ``JPEGTables``
tag. The TIFF also says how the components are coded: ``Photometric`` YCbCr (the usual JPEG), or RGB
(Aperio writes RGB-coded tiles without a marker saying so; a plain decoder would take them for YCbCr
and shift every colour). :func:`tile_stream` makes each tile a self-contained stream that any
decoder reads the way the TIFF means it: the tables spliced in after the start-of-image marker, and
for RGB-coded tiles an Adobe APP14 segment with transform 0 ("no colour transform").

:func:`decode_streams` decodes a batch of such streams with torchvision: nvJPEG on a CUDA device
(batched; the pixels stay on the device), libjpeg-turbo on the CPU (the decoder the direct TIFF path
uses through tifffile/imagecodecs, so the CPU result is identical to it, tested on every shared
slide). :meth:`wsi_screen.slide.Slide.jpeg_tile_streams` reads the streams of a level's tiles.

The screening pipeline decodes on the device when ``reading.jpeg_decoder`` resolves to it
(:func:`resolve_jpeg_device`; ``auto``: on CUDA): :meth:`wsi_screen.slide.Slide.set_jpeg_device`
makes the direct TIFF reader decode all tiles a window needs that are not cached in one batch, and
a batch the device rejects is decoded again on the CPU. ``pipelines/benchmark.py --reader-only``
measures the device decode against the CPU decode limit (issue 16 item 2).
"""

from __future__ import annotations

import functools
import logging
import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

__all__ = [
    "ADOBE_RGB",
    "PHOTOMETRIC_RGB",
    "PHOTOMETRIC_YCBCR",
    "decode_streams",
    "decoder_name",
    "resolve_jpeg_device",
    "tile_stream",
]

logger = logging.getLogger(__name__)

SOI = b"\xff\xd8"
EOI = b"\xff\xd9"
#: APP14 "Adobe" segment (version 100, no flags) with transform 0: the components are RGB.
ADOBE_RGB = b"\xff\xee\x00\x0eAdobe\x00\x64\x00\x00\x00\x00\x00"
#: TIFF Photometric values of the 3-component levels the direct path reads.
PHOTOMETRIC_RGB = 2
PHOTOMETRIC_YCBCR = 6


def _has_adobe_marker(data: bytes) -> bool:
    """Whether the stream's header segments (before the first scan) include an Adobe APP14."""
    i = 2
    while i + 4 <= len(data) and data[i] == 0xFF:
        marker = data[i + 1]
        if marker == 0xDA:  # start of scan: no more header segments
            return False
        length = int.from_bytes(data[i + 2 : i + 4], "big")
        if marker == 0xEE and data[i + 4 : i + 9] == b"Adobe":
            return True
        i += 2 + length
    return False


def tile_stream(data: bytes, jpegtables: bytes | None = None, *, photometric: int) -> bytes:
    """A self-contained JPEG stream of one TIFF tile.

    Args:
        data: the tile's bytes as stored (a JPEG stream, possibly without tables).
        jpegtables: the level's ``JPEGTables`` (a stream of tables only: SOI … EOI), or None.
        photometric: the level's TIFF Photometric: 2 (RGB-coded tiles) or 6 (YCbCr).

    Raises:
        ValueError: ``data`` or ``jpegtables`` is not a JPEG stream, or ``photometric`` is neither.
    """
    if photometric not in (PHOTOMETRIC_RGB, PHOTOMETRIC_YCBCR):
        raise ValueError(f"photometric must be 2 (RGB) or 6 (YCbCr), got {photometric}")
    if data[:2] != SOI:
        raise ValueError(f"tile data is not a JPEG stream (starts with {data[:2].hex() or 'nothing'})")
    head = SOI
    if photometric == PHOTOMETRIC_RGB and not _has_adobe_marker(data):
        head += ADOBE_RGB
    if jpegtables:
        if jpegtables[:2] != SOI or jpegtables[-2:] != EOI:
            raise ValueError("JPEGTables is not a tables-only JPEG stream (SOI … EOI)")
        head += jpegtables[2:-2]
    return head + data[2:]


def resolve_jpeg_device(choice: str, device: torch.device) -> torch.device | None:
    """Where the reader decodes JPEG tiles for ``reading.jpeg_decoder = choice`` on a run whose
    models are on ``device``: ``cpu`` → None (libjpeg-turbo on the reader threads, the default off
    CUDA); ``device`` → ``device`` (nvJPEG on CUDA, torchvision's libjpeg-turbo elsewhere); ``auto``
    → ``device`` on CUDA when nvJPEG decodes a test image there, else None (with a warning).

    Raises:
        ConfigError: ``choice`` is none of the three, or ``device`` was asked for and cannot decode.
    """
    from wsi_screen.errors import ConfigError

    if choice not in ("auto", "cpu", "device"):
        raise ConfigError(f"reading.jpeg_decoder must be 'auto', 'cpu' or 'device', got {choice!r}")
    if choice == "cpu" or (choice == "auto" and device.type != "cuda"):
        return None
    problem = _decoder_problem(device)
    if problem is None:
        return device
    if choice == "device":
        raise ConfigError(
            f"reading.jpeg_decoder=device: JPEG tiles cannot be decoded on {device} ({problem}); "
            "use reading.jpeg_decoder=cpu"
        )
    logger.warning("JPEG tiles are decoded on the CPU: %s cannot decode them (%s)", device, problem)
    return None


@functools.lru_cache(maxsize=8)
def _decoder_problem(device: torch.device) -> str | None:
    """Why :func:`decode_streams` cannot decode on ``device`` (None: a test image round-trips);
    probed once per device and process, not once per slide of a batch."""
    import torch

    try:
        from torchvision.io import encode_jpeg

        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torchvision\.io")
            probe = encode_jpeg(torch.full((3, 16, 16), 128, dtype=torch.uint8), quality=90)
        out = decode_streams([probe.numpy().tobytes()], device=device, tile_size=(16, 16))
    except Exception as exc:  # torchvision built without nvJPEG, a driver error: say which
        return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else 'no message'}"
    if int((out.float() - 128).abs().max()) > 2:
        return "the test image decoded wrong"
    return None


def decoder_name(device: torch.device) -> str:
    """The decoder :func:`decode_streams` uses on ``device``."""
    return "nvJPEG (torchvision)" if device.type == "cuda" else "libjpeg-turbo (torchvision)"


def decode_streams(
    streams: Sequence[bytes | None], *, device: torch.device, tile_size: tuple[int, int]
) -> torch.Tensor:
    """Decode JPEG streams into an (N, H, W, 3) uint8 tensor on ``device``.

    ``tile_size`` (width, height): every tile is placed at the top left of a tile of this size; what
    a smaller (edge) tile leaves, and a ``None`` stream (a tile the scanner never wrote), is white.
    On CUDA the batch is decoded by nvJPEG in one call; elsewhere by libjpeg-turbo on the CPU (and
    then moved to ``device``).

    Raises:
        ValueError: a stream decodes to a tile larger than ``tile_size`` or not 3-channel.
        RuntimeError: the decoder rejected a stream (corrupt data), from torchvision.
    """
    import torch
    from torchvision.io import ImageReadMode, decode_jpeg

    tw, th = int(tile_size[0]), int(tile_size[1])
    out = torch.full((len(streams), th, tw, 3), 255, dtype=torch.uint8, device=device)
    present = [i for i, s in enumerate(streams) if s is not None]
    if not present:
        return out
    data = [torch.frombuffer(bytearray(streams[i] or b""), dtype=torch.uint8) for i in present]
    on_cuda = device.type == "cuda"
    with warnings.catch_warnings():
        # torchvision 0.29 deprecates its image codecs in favour of TorchCodec, which needs FFmpeg
        # and is not installed here; the warning is not the user's to act on.
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torchvision\.io")
        decoded = decode_jpeg(data, mode=ImageReadMode.RGB, device=device if on_cuda else "cpu")
    for i, img in zip(present, decoded, strict=True):
        c, h, w = img.shape
        if c != 3 or h > th or w > tw:
            raise ValueError(f"tile {i} decoded to {c}×{h}×{w}, not 3 channels within {th}×{tw}")
        out[i, :h, :w] = img.permute(1, 2, 0).to(device, non_blocking=True)
    return out
