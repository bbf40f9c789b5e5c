"""Screen every slide of a scanner output directory: discovery, resume, locks, worklist, watch mode.

>>> report = run_batch("scans/", "results/", settings=load_settings("lbc"))
>>> report.exit_code          # 0: every slide screened (or already done), 1: some slide failed

One slide is one unit of work (:func:`process_slide`), run in this process or on a Dask worker
(:mod:`wsi_screen.distributed`):

1. take ``OUT/.locks/<slide-id>.lock`` (``fcntl.flock``; the OS releases it if the process dies),
   so two batches on the same ``OUT`` never screen a slide twice at the same time;
2. remove temporary folders a killed run left for this slide (never one of a live process);
3. **resume**: a complete ``OUT/<slide-id>/`` made from the same file (fingerprint), the same
   result-relevant settings (:func:`config_hash`) and the same models (:func:`models_hash`) is kept
   (status ``skipped``); a slide that failed with the same file, settings and models fails again
   without another attempt (``retry_failed`` retries);
4. otherwise :func:`~wsi_screen.pipeline.run_slide` (or the ``runner`` given), which publishes
   ``OUT/<slide-id>/`` by an atomic rename (:mod:`wsi_screen.output_layout`): a killed batch never
   leaves a half result that looks finished.

After every slide the worklist ``OUT/batch.csv``, ``OUT/batch.json`` and ``OUT/index.html`` is
rewritten atomically, ranked: priority, review, failed, unsatisfactory, negative, then by score.

Modules: :mod:`~wsi_screen.batch.discovery` (finding slides, their ids),
:mod:`~wsi_screen.batch.identity` (fingerprints, settings and models hashes, the resume check),
:mod:`~wsi_screen.batch.locks` (per-slide locks, stale temporary files),
:mod:`~wsi_screen.batch.worker` (one slide), :mod:`~wsi_screen.batch.executors` (where slides run),
:mod:`~wsi_screen.batch.worklist` (the ranked worklist) and :mod:`~wsi_screen.batch.loop`
(:func:`run_batch`).
"""

from __future__ import annotations

from wsi_screen.batch._common import BatchError
from wsi_screen.batch.discovery import (
    SLIDE_SUFFIXES,
    Discovery,
    IgnoredFile,
    SlideEntry,
    assign_slide_ids,
    discover_slides,
)
from wsi_screen.batch.executors import LocalExecutor, SlideExecutor
from wsi_screen.batch.identity import (
    RESULT_NEUTRAL_SETTINGS,
    ResumeKey,
    check_previous,
    config_hash,
    entry_fingerprint,
    entry_signature,
    models_hash,
    models_identity,
)
from wsi_screen.batch.locks import SlideLock, clean_stale
from wsi_screen.batch.loop import BatchReport, run_batch
from wsi_screen.batch.worker import SlideJob, SlideOutcome, SlideRunner, decide, process_slide
from wsi_screen.batch.worklist import rank_outcomes, write_worklist

__all__ = [
    "RESULT_NEUTRAL_SETTINGS",
    "SLIDE_SUFFIXES",
    "BatchError",
    "BatchReport",
    "Discovery",
    "IgnoredFile",
    "LocalExecutor",
    "ResumeKey",
    "SlideEntry",
    "SlideExecutor",
    "SlideJob",
    "SlideLock",
    "SlideOutcome",
    "SlideRunner",
    "assign_slide_ids",
    "check_previous",
    "clean_stale",
    "config_hash",
    "decide",
    "discover_slides",
    "entry_fingerprint",
    "entry_signature",
    "models_hash",
    "models_identity",
    "process_slide",
    "rank_outcomes",
    "run_batch",
    "write_worklist",
]
