"""Exception types of wsi-screen.

Every error a user can cause derives from :class:`WsiScreenError` and carries a one-line message that
says what is wrong and what to do. Each type also inherits the matching built-in exception, so callers
that catch ``FileNotFoundError`` or ``ValueError`` keep working.
"""

from __future__ import annotations

__all__ = [
    "BundleError",
    "BundleNotFoundError",
    "CalibrationError",
    "ConfigError",
    "CorruptSlideError",
    "CorruptTileError",
    "DataError",
    "MissingMppError",
    "SlideNotFoundError",
    "SlideTooLargeError",
    "UnsupportedSlideError",
    "WsiScreenError",
    "one_line",
]


class WsiScreenError(Exception):
    """Base class of every error wsi-screen reports to a user (one-line message, no traceback)."""


class SlideNotFoundError(WsiScreenError, FileNotFoundError):
    """The slide path does not exist."""


class UnsupportedSlideError(WsiScreenError, ValueError):
    """The file is not a whole-slide image, or not one the chosen backend can read."""


class CorruptSlideError(WsiScreenError, OSError):
    """The file looks like a slide but is truncated or structurally corrupt."""


class CorruptTileError(CorruptSlideError):
    """Tile data inside an otherwise readable slide could not be decoded."""


class SlideTooLargeError(WsiScreenError, ValueError):
    """The slide's dimensions are beyond a sane limit (likely corrupt metadata)."""


class MissingMppError(WsiScreenError, ValueError):
    """The slide has no usable µm/px metadata; the user must set ``slide.mpp``."""


class ConfigError(WsiScreenError, ValueError):
    """A configuration file or override is invalid."""


class BundleError(WsiScreenError, ValueError):
    """A model bundle is corrupt, inconsistent or incompatible."""


class BundleNotFoundError(BundleError, FileNotFoundError):
    """A model bundle (name or path) does not exist."""


class CalibrationError(WsiScreenError, ValueError):
    """A batch output and its slide diagnoses cannot calibrate (or validate) an operating point."""


def one_line(exc: BaseException, *, limit: int = 200) -> str:
    """The message of ``exc`` on one line (its type name if empty), cut to ``limit`` characters."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


class DataError(WsiScreenError, ValueError):
    """A training or evaluation data set (crops, annotation files) cannot be read (one-line message)."""
