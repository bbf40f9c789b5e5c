"""Synthetic Papanicolaou-stained cytology slides with exact ground truth.

>>> from wsi_screen.synth import synthesize_slide
>>> result = synthesize_slide("demo.tiff", size=(8192, 8192), seed=1, abnormal="HSIL=5,LSIL=3")
>>> result.counts["HSIL"]
5

Building blocks: :func:`random_layout` / :func:`make_layout` (+ :class:`CellSpec`) say what lies
where, :func:`render_region` draws any region in memory, :func:`write_slide` writes a pyramidal
TIFF or Aperio SVS that OpenSlide and tiffslide both read, :func:`load_truth` reads the truth back.
"""

from wsi_screen.synth.cells import ABNORMAL_CLASSES, CLASS_NAMES, KINDS, CellSpec, KindSpec
from wsi_screen.synth.layout import Layout, make_layout, parse_abnormal, random_layout
from wsi_screen.synth.render import Renderer, render_region
from wsi_screen.synth.stain import STAIN_PROFILES, StainProfile, get_stain_profile
from wsi_screen.synth.synthesize import SynthResult, layout_truth, synthesize_slide
from wsi_screen.synth.truth import SlideTruth, TruthObject, load_truth, truth_path_for
from wsi_screen.synth.writer import WriteStats, pyramid_dimensions, write_slide

__all__ = [
    "ABNORMAL_CLASSES",
    "CLASS_NAMES",
    "KINDS",
    "STAIN_PROFILES",
    "CellSpec",
    "KindSpec",
    "Layout",
    "Renderer",
    "SlideTruth",
    "StainProfile",
    "SynthResult",
    "TruthObject",
    "WriteStats",
    "get_stain_profile",
    "layout_truth",
    "load_truth",
    "make_layout",
    "parse_abnormal",
    "pyramid_dimensions",
    "random_layout",
    "render_region",
    "synthesize_slide",
    "truth_path_for",
    "write_slide",
]
