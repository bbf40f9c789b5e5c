"""Scale-out on Dask distributed: one task per slide, one slide at a time per GPU worker.

>>> executor = DaskExecutor.connect("tcp://scheduler:8786", resources={"GPU": 1})
>>> run_batch("scans/", "results/", settings=settings, executor=executor)

Each task runs :func:`wsi_screen.batch.process_slide` on a worker: the same lock, resume check and
atomic publication as a local batch, so a worker that dies mid-slide leaves only a temporary folder
(cleaned by the next attempt) and the slide is screened again elsewhere — by the scheduler
(``allowed_failures``) and, past that, by this client (``retries``). Models are loaded once per
worker process and kept in a module-level cache. Workers must see the input and output folders
under the same paths (a shared file system).

``distributed`` is an optional dependency (``pip install 'wsi-screen[distributed]'``); it is
imported only when a Dask executor is made.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import uuid
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from wsi_screen.batch import SlideJob, SlideOutcome, process_slide
from wsi_screen.config import Settings
from wsi_screen.errors import WsiScreenError

if TYPE_CHECKING:
    from wsi_screen.pipeline import Models

__all__ = [
    "DaskExecutor",
    "DistributedUnavailableError",
    "cached_models",
    "detect_gpus",
    "parse_resource",
    "screen_slide_task",
]

logger = logging.getLogger(__name__)

_MODELS: dict[str, Models] = {}
_MODELS_LOCK = threading.Lock()


class DistributedUnavailableError(WsiScreenError, ImportError):
    """Dask distributed is not installed, or the scheduler cannot be reached."""


def _require_distributed() -> Any:
    try:
        import distributed
    except ImportError as exc:
        raise DistributedUnavailableError(
            "scale-out on Dask needs the 'distributed' package: pip install 'wsi-screen[distributed]'"
        ) from exc
    return distributed


def parse_resource(text: str | None) -> dict[str, float] | None:
    """``"GPU=1"`` → ``{"GPU": 1.0}``; ``"none"``, ``""`` or None → no resource restriction."""
    if text is None or text.strip().lower() in ("", "none"):
        return None
    name, sep, amount = text.partition("=")
    name = name.strip()
    try:
        value = float(amount) if sep else 1.0
    except ValueError:
        value = -1.0
    if not name or not name.replace("_", "").replace("-", "").isalnum() or value <= 0:
        raise WsiScreenError(f"resource {text!r} must look like NAME=AMOUNT, e.g. GPU=1 (or 'none')")
    return {name: value}


def _models_key(settings: Settings) -> str:
    data = settings.to_dict()
    part = {k: data[k] for k in ("localization", "classification", "runtime")}
    return hashlib.sha256(json.dumps(part, sort_keys=True).encode()).hexdigest()


def cached_models(settings: Settings) -> Models:
    """The models for ``settings``, loaded once per process (the worker-side cache)."""
    from wsi_screen.pipeline import load_models

    key = _models_key(settings)
    with _MODELS_LOCK:
        models = _MODELS.get(key)
        if models is None:
            models = _MODELS[key] = load_models(settings)
        return models


def cached_model_count() -> int:
    """How many model sets this process holds (run on workers by tests and diagnostics)."""
    return len(_MODELS)


def screen_slide_task(job: SlideJob) -> SlideOutcome:
    """The Dask task: screen one slide on this worker (waits for the slide's lock if needed)."""
    outcome = process_slide(
        job, models=lambda: cached_models(job.settings), progress=False, wait_for_lock=True
    )
    if outcome is None:  # pragma: no cover - a blocking wait without stop always returns an outcome
        raise RuntimeError(f"could not lock {job.entry.slide_id}")
    return outcome


def _package_version() -> str:
    from wsi_screen import __version__

    return __version__


def detect_gpus() -> list[str]:
    """Indices of the CUDA GPUs visible here (empty without CUDA or torch)."""
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a dependency
        return []
    try:
        return [str(i) for i in range(torch.cuda.device_count())]
    except RuntimeError:  # pragma: no cover - broken driver
        return []


class DaskExecutor:
    """Sends one task per slide to a Dask cluster (see :func:`wsi_screen.batch.run_batch`)."""

    def __init__(
        self,
        client: Any,
        *,
        resources: Mapping[str, float] | None = None,
        retries: int = 2,
        cluster: Any = None,
    ) -> None:
        self.client = client
        self.cluster = cluster
        self.resources = dict(resources) if resources else None
        self.retries = max(0, int(retries))
        self._futures: dict[Any, SlideJob] = {}

    # -- construction ----------------------------------------------------------------------------
    @classmethod
    def connect(
        cls,
        address: str,
        *,
        resources: Mapping[str, float] | None = None,
        retries: int = 2,
        timeout_s: float = 30.0,
    ) -> DaskExecutor:
        """Connect to a running scheduler (``tcp://host:8786``) and check its workers."""
        distributed = _require_distributed()
        try:
            client = distributed.Client(address, timeout=f"{timeout_s}s")
        except (OSError, TimeoutError) as exc:
            raise DistributedUnavailableError(
                f"cannot reach the Dask scheduler at {address} ({' '.join(str(exc).split())[:200]})"
            ) from exc
        executor = cls(client, resources=resources, retries=retries)
        try:
            executor.check_workers(timeout_s=timeout_s)
        except BaseException:
            client.close()
            raise
        return executor

    @classmethod
    def local(
        cls,
        n_workers: int | None = None,
        *,
        gpus: Sequence[str] | None = None,
        resources: Mapping[str, float] | None = None,
        retries: int = 2,
        allowed_failures: int = 2,
        timeout_s: float = 120.0,
    ) -> DaskExecutor:
        """Start a local cluster of worker processes, one slide at a time each, pinned to GPUs.

        Args:
            n_workers: worker processes (default: one per GPU in ``gpus``, else 1).
            gpus: GPU indices; worker *i* sees only ``gpus[i % len(gpus)]`` (``CUDA_VISIBLE_DEVICES``).
                Default: every CUDA GPU here; none on a machine without CUDA (workers use the CPU).
            resources: declared by every worker and required by every task (e.g. ``{"GPU": 1}``).
            retries: resubmissions by this client after the scheduler gave up on a task.
            allowed_failures: worker deaths a task may cause before the scheduler gives up on it.
        """
        distributed = _require_distributed()
        from distributed import Nanny, Scheduler, SpecCluster

        gpu_list = list(gpus) if gpus is not None else detect_gpus()
        n = int(n_workers) if n_workers else max(1, len(gpu_list))
        workers: dict[str, dict[str, Any]] = {}
        for i in range(n):
            env = {"CUDA_VISIBLE_DEVICES": gpu_list[i % len(gpu_list)]} if gpu_list else {}
            workers[f"wsi-screen-{i}"] = {
                "cls": Nanny,
                "options": {
                    "host": "127.0.0.1",
                    "nthreads": 1,
                    "resources": dict(resources or {}),
                    "env": env,
                    "memory_limit": 0,
                    "dashboard": False,
                    "dashboard_address": None,
                    "silence_logs": logging.WARNING,
                },
            }
        scheduler = {
            "cls": Scheduler,
            "options": {
                "host": "127.0.0.1",
                "port": 0,
                "dashboard": False,
                "dashboard_address": None,
                "allowed_failures": int(allowed_failures),
            },
        }
        cluster = SpecCluster(  # type: ignore[no-untyped-call]
            workers=workers, scheduler=scheduler, name="wsi-screen", silence_logs=logging.WARNING
        )
        try:
            client = distributed.Client(cluster)
            client.wait_for_workers(n, timeout=timeout_s)
        except BaseException:
            cluster.close()
            raise
        logger.info(
            "local Dask cluster at %s: %d worker process(es)%s",
            cluster.scheduler_address,
            n,
            f", GPUs {', '.join(gpu_list)}" if gpu_list else " on the CPU",
        )
        return cls(client, resources=resources, retries=retries, cluster=cluster)

    def check_workers(self, *, timeout_s: float = 30.0) -> None:
        """Wait for a worker; refuse a cluster where no worker declares the required resource."""
        try:
            self.client.wait_for_workers(1, timeout=timeout_s)
        except (TimeoutError, OSError) as exc:
            raise DistributedUnavailableError(
                f"no Dask worker joined the scheduler within {timeout_s:g} s; start workers with "
                "dask-worker SCHEDULER --nthreads 1 --resources 'GPU=1'"
            ) from exc
        info = self.client.scheduler_info().get("workers", {})
        if self.resources:
            name, amount = next(iter(self.resources.items()))
            able = [w for w in info.values() if float(w.get("resources", {}).get(name, 0)) >= amount]
            if not able:
                raise DistributedUnavailableError(
                    f"no Dask worker declares the resource {name}={amount:g}; start workers with "
                    f"--resources '{name}={amount:g}', or ask for none: resources=None"
                )
        try:
            versions = self.client.run(_package_version)
        except Exception:  # pragma: no cover - diagnostics only
            return
        from wsi_screen import __version__

        other = sorted({v for v in versions.values() if v != __version__})
        if other:
            logger.warning(
                "Dask workers run wsi-screen %s, this client %s: results may differ",
                ", ".join(other),
                __version__,
            )

    # -- SlideExecutor -------------------------------------------------------------------------------
    def submit(self, job: SlideJob) -> None:
        key = f"wsi-screen-{job.entry.slide_id}-{uuid.uuid4().hex[:8]}"
        future = self.client.submit(screen_slide_task, job, key=key, pure=False, resources=self.resources)
        self._futures[future] = job

    @property
    def busy(self) -> int:
        return len(self._futures)

    def results(self, *, timeout: float) -> list[SlideOutcome]:
        if not self._futures:
            return []
        distributed = _require_distributed()
        try:
            done, _ = distributed.wait(list(self._futures), timeout=timeout, return_when="FIRST_COMPLETED")
        except TimeoutError:
            return []
        out: list[SlideOutcome] = []
        for future in done:
            job = self._futures.pop(future)
            if future.status == "finished":
                try:
                    out.append(future.result())
                    continue
                except Exception as exc:  # pragma: no cover - a result that cannot be fetched
                    error: BaseException = exc
            else:
                try:
                    exc2 = future.exception()
                except Exception as exc:  # cancelled futures raise here
                    exc2 = exc
                error = exc2 if isinstance(exc2, BaseException) else RuntimeError(str(future.status))
            future.release()
            message = f"{type(error).__name__}: {' '.join(str(error).split())[:300]}"
            if job.attempt <= self.retries:
                logger.warning(
                    "%s: worker failure (%s); submitting again (attempt %d)",
                    job.entry.rel,
                    message,
                    job.attempt + 1,
                )
                from dataclasses import replace

                self.submit(replace(job, attempt=job.attempt + 1))
                continue
            logger.error(
                "%s: failed on the cluster after %d attempt(s): %s", job.entry.rel, job.attempt, message
            )
            out.append(
                SlideOutcome(
                    job.entry.rel,
                    job.entry.slide_id,
                    "failed",
                    error=f"worker failure after {job.attempt} attempt(s): {message}",
                )
            )
        return out

    def cancel(self) -> list[SlideJob]:
        jobs = list(self._futures.values())
        if self._futures:
            self.client.cancel(list(self._futures))
        self._futures.clear()
        return jobs

    def close(self) -> None:
        self.cancel()
        try:
            self.client.close()
        finally:
            if self.cluster is not None:
                self.cluster.close()
