"""Train a cell classifier on a :class:`~wsi_screen.train.data.CropSet` and write a model bundle.

The recipe (every part is a :class:`TrainConfig` field and a ``wsi-screen train classifier`` option):

- **split** by group (slide / patient / source image) with :func:`wsi_screen.metrics.grouped_split`,
  stratified by class; no group is in two splits. The split is saved as ``split.json`` in the work
  folder and in the bundle.
- **model**: any timm name or registered architecture (``runicnet``, ``runicnet-tiny``), from random
  weights (no pretrained weights exist here) or from a bundle (``init``); with ``freeze_epochs`` the
  backbone stays frozen for the first epochs (only the head learns) — useful only when starting from a
  bundle.
- **loss**: cross-entropy or focal loss (``focal_gamma``), optional class weights ∝ 1/frequency
  (``class_weights="balanced"``) or a class-balanced sampler (``balanced_sampler``), optionally
  balanced over sources within each class as well (``balance_sources``: a class held by Herlev and
  ``lbc-cells`` draws each half of the time, however many crops each has); label smoothing;
  ``binary_loss`` adds that weight × the log loss of the screening score itself (the summed
  probability of the abnormal classes against the rest), which the per-class loss does not train.
- **optimizer**: AdamW, linear warm-up then cosine decay per step.
- **augmentation**: :mod:`wsi_screen.train.augment`.
- **model selection / early stopping** on the validation split (``monitor``, default macro F1;
  ``binary_auroc``: the AUROC of the screening score, abnormal classes against the rest;
  ``patience`` epochs without improvement stops training); the best epoch's weights are kept.
- **checkpoints**: ``<work>/last.pt`` after every epoch (model, optimizer, scheduler, RNG states,
  history, best weights); ``resume=True`` continues from it. Loaded with ``torch.load(weights_only=True)``.
- **export**: RunicNet is re-parameterized (``arch_kwargs: {deploy: true}``); the bundle is written
  with :func:`wsi_screen.models.save_bundle`, then loaded back with ``load_bundle`` +
  :class:`~wsi_screen.classify.CellClassifier` — exactly as the pipeline loads it — to compute the
  validation and test metrics (:func:`wsi_screen.metrics.classification_metrics`) stored in the bundle.
"""

from __future__ import annotations

import copy
import csv
import json
import logging
import math
import os
import re
import sys
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from numpy.typing import NDArray

from wsi_screen.errors import WsiScreenError
from wsi_screen.jsonio import write_json
from wsi_screen.metrics import jsonable
from wsi_screen.train.augment import AugmentConfig
from wsi_screen.train.data import CropSet, DataError, order_classes

if TYPE_CHECKING:
    import torch
    from torch import nn

    from wsi_screen.classify import CellClassifier
    from wsi_screen.models.bundle import ModelBundle
    from wsi_screen.stain import ReinhardStats
    from wsi_screen.train.pasted import ScreenedCells

__all__ = [
    "DEFAULT_ARCH",
    "TrainConfig",
    "TrainResult",
    "evaluate_bundles",
    "evaluate_crops",
    "pool_absent_classes",
    "predict_crops",
    "source_balance_factors",
    "source_family",
    "split_dataset",
    "train_classifier",
]

logger = logging.getLogger(__name__)

#: A small timm network that trains from scratch on a CPU in reasonable time (speed in
#: docs/performance.md, *The default small networks*).
DEFAULT_ARCH = "mobilenetv3_small_100"
CHECKPOINT_NAME = "last.pt"
SPLIT_NAME = "split.json"
_CHECKPOINT_FORMAT = 1
_NORMAL = ("NILM", "organism", "endocervical", "artifact")


class TrainingError(WsiScreenError, RuntimeError):
    """Training cannot start or continue (one-line message)."""


@dataclass(frozen=True)
class TrainConfig:
    """Everything that defines a training run (recorded in the bundle as ``training.recipe``)."""

    arch: str = DEFAULT_ARCH
    arch_kwargs: dict[str, Any] = field(default_factory=dict)
    epochs: int = 30
    batch_size: int = 64
    lr: float = 2e-3
    weight_decay: float = 0.02
    warmup_epochs: float = 1.0
    focal_gamma: float | None = None
    class_weights: Literal["none", "balanced"] = "none"
    balanced_sampler: bool = False
    balance_sources: bool = False
    label_smoothing: float = 0.0
    binary_loss: float = 0.0
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    freeze_epochs: int = 0
    init: str | None = None
    patience: int = 8
    monitor: Literal["macro_f1", "accuracy", "loss", "binary_auroc"] = "macro_f1"
    val_fraction: float = 0.15
    test_fraction: float = 0.15
    seed: int = 0
    device: str = "auto"
    threads: int = 0
    max_minutes: float | None = None
    samples_per_epoch: int | None = None
    eval_batch_size: int = 128
    half: bool = False

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1:
            raise ValueError("epochs and batch_size must be ≥ 1")
        if self.lr <= 0:
            raise ValueError("lr must be positive")
        if self.freeze_epochs < 0 or self.patience < 0:
            raise ValueError("freeze_epochs and patience must be ≥ 0")
        if self.focal_gamma is not None and self.focal_gamma < 0:
            raise ValueError("focal_gamma must be ≥ 0")
        if self.binary_loss < 0:
            raise ValueError("binary_loss must be ≥ 0")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["augment"] = self.augment.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> TrainConfig:
        data = dict(d)
        data["augment"] = AugmentConfig(**data.get("augment", {}))
        return cls(**data)


@dataclass
class TrainResult:
    """What :func:`train_classifier` produced."""

    bundle: ModelBundle
    out_dir: Path
    work_dir: Path
    metrics: dict[str, Any]
    history: list[dict[str, Any]]
    best_epoch: int
    seconds: float


# -- helpers ---------------------------------------------------------------------------------------------


def _tty() -> bool:
    return sys.stderr.isatty()


def split_dataset(
    data: CropSet, *, val_fraction: float, test_fraction: float, seed: int
) -> dict[str, NDArray[np.intp]]:
    """Grouped, class-stratified train/val/test indices (no group in two splits)."""
    from wsi_screen.metrics import grouped_split

    n_groups = len(set(data.groups.tolist()))
    needed = 1 + int(val_fraction > 0) + int(test_fraction > 0)
    if n_groups < needed:
        raise DataError(
            f"the data has {n_groups} group(s) (slides/patients); a train/val/test split by group needs "
            f"at least {needed} (add data, or lower val_fraction / test_fraction to 0)"
        )
    split = grouped_split(
        data.groups, val_fraction=val_fraction, test_fraction=test_fraction, seed=seed, labels=data.labels
    )
    out = {"train": split.train, "val": split.val, "test": split.test}
    for a in out:
        for b in out:
            if a < b:
                common = set(data.groups[out[a]].tolist()) & set(data.groups[out[b]].tolist())
                if common:  # pragma: no cover - guaranteed by grouped_split
                    raise AssertionError(f"groups in both {a} and {b}: {sorted(common)[:3]}")
    if val_fraction > 0 and not len(out["val"]):
        raise DataError("the validation split is empty: add more groups or lower val_fraction")
    if not len(out["train"]):
        raise DataError("the training split is empty: add more groups")
    return out


def _split_json(data: CropSet, split: Mapping[str, NDArray[np.intp]], cfg: TrainConfig) -> dict[str, Any]:
    out: dict[str, Any] = {
        "seed": cfg.seed,
        "val_fraction": cfg.val_fraction,
        "test_fraction": cfg.test_fraction,
        "group_rule": "every group (slide / patient / source image) lies in exactly one split",
        "data_fingerprint": data.fingerprint(),
        "class_names": list(data.class_names),
    }
    for name, idx in split.items():
        groups = sorted(set(data.groups[idx].tolist()))
        counts = np.bincount(data.labels[idx], minlength=len(data.class_names))
        out[name] = {
            "n": len(idx),
            "class_counts": {c: int(counts[i]) for i, c in enumerate(data.class_names)},
            "groups": groups,
        }
    return out


def _given_split(
    data: CropSet, given: Mapping[str, Sequence[int] | NDArray[np.integer[Any]]]
) -> dict[str, NDArray[np.intp]]:
    unknown = set(given) - {"train", "val", "test"}
    if unknown or "train" not in given:
        raise DataError(f"split needs 'train' (and 'val', 'test'); got {sorted(given)}")
    out = {k: np.asarray(given.get(k, []), np.intp) for k in ("train", "val", "test")}
    for k, idx in out.items():
        if idx.size and (int(idx.min()) < 0 or int(idx.max()) >= len(data)):
            raise DataError(f"split {k!r} has indices outside the {len(data)} crops")
    seen = np.concatenate(list(out.values()))
    if len(np.unique(seen)) != len(seen):
        raise DataError("the given split parts overlap")
    if not len(out["train"]):
        raise DataError("the given training split is empty")
    return out


def _split_from_json(data: CropSet, saved: Mapping[str, Any]) -> dict[str, NDArray[np.intp]]:
    out: dict[str, NDArray[np.intp]] = {}
    for name in ("train", "val", "test"):
        groups = set(saved[name]["groups"])
        out[name] = np.flatnonzero(np.isin(data.groups, list(groups))).astype(np.intp)
    return out


def _head_parameters(model: nn.Module) -> set[int]:
    get = getattr(model, "get_classifier", None)
    head = get() if callable(get) else None
    if head is None:
        raise TrainingError(f"{type(model).__name__} has no get_classifier(): cannot freeze the backbone")
    return {id(p) for p in head.parameters()}


def _set_frozen(model: nn.Module, frozen: bool) -> None:
    head = _head_parameters(model)
    for p in model.parameters():
        p.requires_grad_(not frozen or id(p) in head)


def _widen_inputs(model: nn.Module, state: dict[str, Any]) -> list[str]:
    """Zero-pad the input-channel dimension of weights for a model with more input channels.

    An RGB bundle initialises an RGB + mask model this way: the new mask channel's weights start at
    zero, so the network first computes exactly what the RGB bundle did and learns to use the mask.
    Returns the widened keys.
    """
    import torch

    own = model.state_dict()
    widened = []
    for k, v in state.items():
        mine = own.get(k)
        if (
            mine is not None
            and v.ndim >= 2
            and mine.ndim == v.ndim
            and mine.shape[1] > v.shape[1]
            and mine.shape[:1] == v.shape[:1]
            and mine.shape[2:] == v.shape[2:]
        ):
            pad = v.new_zeros((v.shape[0], mine.shape[1] - v.shape[1], *v.shape[2:]))
            state[k] = torch.cat([v, pad], dim=1)
            widened.append(k)
    return widened


def _load_init(model: nn.Module, bundle: ModelBundle, class_names: Sequence[str]) -> str:
    """Load a bundle's weights into ``model``; the head too when the classes are the same.

    An RGB bundle can initialise an RGB + mask model (:func:`_widen_inputs`).
    """
    state = dict(bundle.state_dict())
    widened = _widen_inputs(model, state)
    note = f"; input layer widened for the mask channel ({', '.join(widened)})" if widened else ""
    if list(bundle.config.class_names) == list(class_names):
        model.load_state_dict(state, strict=True)
        return "all weights" + note
    head = _head_parameters(model)
    head_names = {n for n, p in model.named_parameters() if id(p) in head}
    state = {k: v for k, v in state.items() if k not in head_names}
    missing, unexpected = model.load_state_dict(state, strict=False)
    bad = [k for k in missing if k not in head_names]
    if bad or unexpected:
        raise TrainingError(
            f"init bundle {bundle.name!r}: weights do not fit the model "
            f"({len(bad)} missing, {len(unexpected)} unexpected)"
        )
    return "backbone (new head for the new classes)" + note


def _dataset_mean_std(
    crops: NDArray[np.uint8], idx: NDArray[np.intp], seed: int
) -> tuple[list[float], list[float]]:
    rng = np.random.default_rng(seed)
    take = np.sort(rng.choice(idx, size=min(len(idx), 512), replace=False))
    x = np.asarray(crops[take], np.float64) / 255.0
    c = int(x.shape[-1])
    mean = x.reshape(-1, c).mean(axis=0)
    std = x.reshape(-1, c).std(axis=0)
    return [round(float(m), 4) for m in mean], [round(float(max(s, 1e-3)), 4) for s in std]


def _loss_fn(cfg: TrainConfig, weights: torch.Tensor | None, abnormal: Sequence[int] = ()) -> Any:
    """The training loss: the per-class loss, plus ``cfg.binary_loss`` × the log loss of the
    screening score (the summed probability of the ``abnormal`` class indices)."""
    import torch
    import torch.nn.functional as F

    def loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        base = per_class(logits, target)
        if cfg.binary_loss <= 0 or not abnormal:
            return base
        n_cls = logits.shape[1]
        is_ab = torch.zeros(n_cls, dtype=torch.bool, device=logits.device)
        is_ab[list(abnormal)] = True
        logp = F.log_softmax(logits.float(), dim=1)
        log_ab = torch.logsumexp(logp.masked_fill(~is_ab, -math.inf), dim=1)
        log_rest = torch.logsumexp(logp.masked_fill(is_ab, -math.inf), dim=1)
        binary = -torch.where(is_ab[target], log_ab, log_rest).mean()
        return base + cfg.binary_loss * binary

    def per_class(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if cfg.focal_gamma is None:
            return F.cross_entropy(logits, target, weight=weights, label_smoothing=cfg.label_smoothing)
        logp = F.log_softmax(logits.float(), dim=1)
        logp_t = logp.gather(1, target[:, None])[:, 0]
        p_t = logp_t.exp()
        ce = F.cross_entropy(
            logits.float(), target, weight=weights, label_smoothing=cfg.label_smoothing, reduction="none"
        )
        fl = (1.0 - p_t).clamp(min=0.0) ** cfg.focal_gamma * ce
        denom = weights[target].sum() if weights is not None else torch.tensor(float(len(target)))
        return fl.sum() / denom

    return loss


def _lr_factor(step: int, *, warmup: int, total: int) -> float:
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def _normalized(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """Grey levels [0, 255] → model input, exactly as :class:`CellClassifier` does it."""
    return (x - mean) / std


def predict_crops(
    model: nn.Module,
    crops: NDArray[np.uint8],
    *,
    mean: Sequence[float],
    std: Sequence[float],
    device: torch.device,
    batch_size: int = 128,
) -> NDArray[np.float32]:
    """Softmax probabilities of a model (eval mode, no augmentation) for uint8 (N, S, S, C) crops."""
    import torch

    m = torch.tensor(mean, device=device).view(1, -1, 1, 1) * 255.0
    s = torch.tensor(std, device=device).view(1, -1, 1, 1) * 255.0
    out = []
    was_training = model.training
    model.eval()
    with torch.inference_mode():
        for start in range(0, len(crops), batch_size):
            x = torch.from_numpy(np.ascontiguousarray(crops[start : start + batch_size])).to(device)
            x = x.permute(0, 3, 1, 2).float()
            out.append(torch.softmax(model(_normalized(x, m, s)).float(), dim=1).cpu().numpy())
    model.train(was_training)
    if not out:
        return np.zeros((0, 0), np.float32)
    return np.concatenate(out).astype(np.float32)


def _abnormal_default(class_names: Sequence[str]) -> list[str]:
    return [c for c in class_names if c not in _NORMAL]


def _threshold_for_sensitivity(
    score: NDArray[np.float64], positive: NDArray[np.bool_], target: float
) -> float | None:
    """The largest threshold t with sensitivity(score ≥ t) ≥ target (None without positives)."""
    pos = np.sort(score[positive])[::-1]
    if not len(pos):
        return None
    k = math.ceil(target * len(pos))
    return float(pos[k - 1])


def evaluate_crops(
    probs: NDArray[np.floating[Any]],
    labels: NDArray[np.int64],
    class_names: Sequence[str],
    abnormal_classes: Sequence[str],
) -> dict[str, Any]:
    """:func:`wsi_screen.metrics.classification_metrics` of a prediction table (HSIL/NILM if present)."""
    from wsi_screen.metrics import classification_metrics

    return classification_metrics(
        labels,
        probs,
        list(class_names),
        list(abnormal_classes),
        normal_class="NILM"
        if "NILM" in class_names
        else next((c for c in class_names if c not in abnormal_classes), class_names[0]),
        hsil_class="HSIL",
    )


# -- the training loop -----------------------------------------------------------------------------------


_FAMILY_RE = re.compile(r"^([^/#:]*?)(?:-\d+)?(?:[/#:].*)?$")


def source_family(source: str) -> str:
    """The data source a crop's ``sources`` entry names: the text before the first ``/``, ``#`` or
    ``:``, without a trailing ``-<number>`` (``synth-3#12:nucleus`` → ``synth``, ``herlev`` →
    ``herlev``, ``hsil/0001.png`` → ``hsil``)."""
    m = _FAMILY_RE.match(source)
    return m.group(1) if m is not None and m.group(1) else source


def source_balance_factors(
    labels: NDArray[np.integer[Any]], sources: NDArray[np.str_]
) -> NDArray[np.float64]:
    """Per-crop sampling factors that give every source family (:func:`source_family`) of a class the
    same share of that class.

    A crop of class *c* from family *s* gets ``n_c / (S_c · n_cs)``: *n_c* crops of the class, *S_c*
    families that hold it, *n_cs* of them from *s*. Each class keeps its total mass (*n_c*), so the
    factors compose with class balance (``balanced_sampler``) and with per-crop ``sample_weights``.
    """
    labels = np.asarray(labels)
    if labels.ndim != 1 or np.shape(sources) != labels.shape:
        raise ValueError(
            f"labels and sources must be two (N,) arrays, got {labels.shape} and {np.shape(sources)}"
        )
    families = np.array([source_family(str(x)) for x in np.asarray(sources).tolist()], dtype=str)
    out = np.ones(len(labels), np.float64)
    for c in np.unique(labels):
        in_c = labels == c
        names, inverse, n_cs = np.unique(families[in_c], return_inverse=True, return_counts=True)
        out[in_c] = in_c.sum() / (len(names) * n_cs[inverse])
    return out


def train_classifier(
    data: CropSet,
    out_dir: str | os.PathLike[str],
    *,
    config: TrainConfig | None = None,
    name: str | None = None,
    class_names: Sequence[str] | None = None,
    abnormal_classes: Sequence[str] | None = None,
    stain_target: ReinhardStats | None = None,
    work_dir: str | os.PathLike[str] | None = None,
    resume: bool = False,
    progress: bool = True,
    description: str = "",
    intended_use: str = "",
    limitations: str = "",
    data_description: Mapping[str, Any] | None = None,
    sample_weights: NDArray[np.floating[Any]] | None = None,
    version: str = "1",
    split: Mapping[str, Sequence[int] | NDArray[np.integer[Any]]] | None = None,
) -> TrainResult:
    """Train a classifier on ``data`` and write the bundle folder ``out_dir``.

    Args:
        data: the crops (at the bundle µm/px and input size, Reinhard-normalized to ``stain_target``).
        out_dir: the bundle folder (replaced atomically); ``split.json`` and ``history.json`` go in it.
        config: the recipe (:class:`TrainConfig`).
        name: bundle name (default: the folder name).
        class_names: the bundle's classes, in output order (default: the data's classes, Bethesda order).
        abnormal_classes: default every class but NILM and artifact.
        stain_target: the Reinhard target the crops were normalized to (recorded in the bundle; default
            :data:`wsi_screen.stain.DEFAULT_TARGET`).
        work_dir: checkpoints and logs (default ``<out_dir>.train`` beside the bundle).
        resume: continue from ``<work_dir>/last.pt`` when it exists.
        data_description: recorded in the bundle as ``training.data`` (default ``data.describe()``).
        sample_weights: (N,) relative sampling weight of each crop of ``data`` (e.g. hard negatives
            drawn more often); training then samples with replacement, times the class balance of
            ``balanced_sampler``. The validation and test splits are not weighted.
        split: indices of ``data`` for ``train``, ``val`` and optionally ``test`` (e.g. from a split
            manifest) instead of the grouped split by ``val_fraction``/``test_fraction``; they must not
            overlap.
    """
    import torch

    from wsi_screen.models.bundle import BundleConfig, StainTarget, save_bundle
    from wsi_screen.models.registry import create_model
    from wsi_screen.stain import DEFAULT_TARGET
    from wsi_screen.train.augment import augment_batch
    from wsi_screen.train.common import Progress, resolve_training_device, seed_everything

    t_start = time.perf_counter()
    cfg = config or TrainConfig()
    out = Path(out_dir)
    work = Path(work_dir) if work_dir is not None else out.with_name(out.name + ".train")
    work.mkdir(parents=True, exist_ok=True)
    bundle_name = name or out.name
    names = list(class_names) if class_names is not None else order_classes(data.present_classes())
    data = data.with_classes(names)
    abnormal = list(abnormal_classes) if abnormal_classes is not None else _abnormal_default(names)
    target = DEFAULT_TARGET if stain_target is None else stain_target
    if len(data) == 0:
        raise DataError("the training data is empty")
    if len(data.present_classes()) < 2:
        raise DataError(f"training needs at least two classes; the data has only {data.present_classes()}")

    device = resolve_training_device(cfg.device, threads=cfg.threads)
    rng = seed_everything(cfg.seed, deterministic=False)

    # --- checkpoint / split
    ckpt_path = work / CHECKPOINT_NAME
    ckpt: dict[str, Any] | None = None
    if resume and ckpt_path.is_file():
        ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
        if ckpt.get("format") != _CHECKPOINT_FORMAT:
            raise TrainingError(f"{ckpt_path}: unknown checkpoint format")
        saved_cfg = json.loads(ckpt["config"])
        for key in ("arch", "arch_kwargs", "seed", "val_fraction", "test_fraction", "init"):
            if saved_cfg.get(key) != cfg.to_dict().get(key):
                raise TrainingError(
                    f"resume: the checkpoint was trained with {key}={saved_cfg.get(key)!r}, not "
                    f"{cfg.to_dict().get(key)!r} (use the same options, or another work_dir)"
                )
        if ckpt["data_fingerprint"] != data.fingerprint() or ckpt["class_names"] != names:
            raise TrainingError("resume: the data or the classes differ from the checkpoint's")
        logger.info("resuming from %s (epoch %d done)", ckpt_path, int(ckpt["epoch"]))
    elif resume:
        logger.info("no checkpoint in %s; starting from scratch", work)
    split_file = work / SPLIT_NAME
    given = split
    if given is not None:
        parts = _given_split(data, given)
    elif ckpt is not None and split_file.is_file():
        parts = _split_from_json(data, json.loads(split_file.read_text(encoding="utf-8")))
    else:
        parts = split_dataset(
            data, val_fraction=cfg.val_fraction, test_fraction=cfg.test_fraction, seed=cfg.seed
        )
    split_info = _split_json(data, parts, cfg)
    if given is not None:
        split_info["group_rule"] = "given by the caller (a split manifest): indices, not groups"
    write_json(split_file, jsonable(split_info), default=None)
    tr_idx, va_idx, te_idx = parts["train"], parts["val"], parts["test"]
    logger.info(
        "split by group: train %d crops (%d groups), val %d (%d), test %d (%d)",
        len(tr_idx),
        len(split_info["train"]["groups"]),
        len(va_idx),
        len(split_info["val"]["groups"]),
        len(te_idx),
        len(split_info["test"]["groups"]),
    )

    # --- model
    arch = cfg.arch
    arch_kwargs = dict(cfg.arch_kwargs)
    init_note = "random weights (no pretrained weights are available)"
    init_bundle = None
    if cfg.init is not None:
        from wsi_screen.models.bundle import load_bundle

        init_bundle = load_bundle(cfg.init, task="classification")
        arch = init_bundle.config.architecture
        arch_kwargs = dict(init_bundle.config.arch_kwargs)
        if arch_kwargs.get("deploy"):
            raise TrainingError(
                f"init bundle {init_bundle.name!r}: a re-parameterized (deploy) RunicNet cannot be trained "
                "further"
            )
    if init_bundle is not None and init_bundle.config.in_channels > data.channels:
        raise TrainingError(
            f"init bundle {init_bundle.name!r} takes {init_bundle.config.input_representation} crops; the "
            f"data is {data.representation} (cut the crops with mask_channel)"
        )
    model = create_model(arch, num_classes=len(names), in_chans=data.channels, **arch_kwargs)
    if init_bundle is not None and ckpt is None:
        init_note = f"initialised from bundle {init_bundle.name} ({_load_init(model, init_bundle, names)})"
    model.to(device)
    if ckpt is not None:
        mean, std = list(ckpt["mean"]), list(ckpt["std"])
    else:
        mean, std = _dataset_mean_std(data.crops, tr_idx, cfg.seed)
        if init_bundle is not None:  # the bundle's RGB statistics; the data's for a new mask channel
            k = len(init_bundle.config.mean)
            mean = list(init_bundle.config.mean) + mean[k:]
            std = list(init_bundle.config.std) + std[k:]
    mean_t = torch.tensor(mean, device=device).view(1, -1, 1, 1) * 255.0
    std_t = torch.tensor(std, device=device).view(1, -1, 1, 1) * 255.0

    counts = np.bincount(data.labels[tr_idx], minlength=len(names)).astype(np.float64)
    weights_t = None
    if cfg.class_weights == "balanced":
        w = np.where(counts > 0, counts.sum() / np.maximum(counts, 1) / max(1, int((counts > 0).sum())), 0.0)
        weights_t = torch.tensor(w, dtype=torch.float32, device=device)
    loss_fn = _loss_fn(cfg, weights_t, [names.index(c) for c in abnormal])

    per_epoch = cfg.samples_per_epoch or len(tr_idx)
    steps_per_epoch = max(1, math.ceil(per_epoch / cfg.batch_size))
    total_steps = steps_per_epoch * cfg.epochs
    warmup = round(cfg.warmup_epochs * steps_per_epoch)
    optimizer = torch.optim.AdamW([p for p in model.parameters()], lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: _lr_factor(s, warmup=warmup, total=total_steps)
    )
    gen = torch.Generator().manual_seed(cfg.seed)
    history: list[dict[str, Any]] = []
    best_score = -math.inf
    best_state: dict[str, torch.Tensor] | None = None
    best_epoch = 0
    stale = 0
    start_epoch = 1
    done = False
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        gen.set_state(ckpt["torch_generator"])
        rng.bit_generator.state = json.loads(ckpt["numpy_rng"])
        torch.set_rng_state(ckpt["torch_rng"])
        history = json.loads(ckpt["history"])
        best_score = float(ckpt["best_score"])
        best_state = ckpt["best_model"] or None
        best_epoch = int(ckpt["best_epoch"])
        stale = int(ckpt["stale"])
        start_epoch = int(ckpt["epoch"]) + 1
        # Early stopping is final; a run that reached its epochs or its time limit can be extended.
        done = str(ckpt["stop_reason"]) == "early_stop"

    sample_p = None
    if cfg.balanced_sampler or cfg.balance_sources or sample_weights is not None:
        sample_p = np.ones(len(tr_idx), np.float64)
        if cfg.balance_sources:
            sample_p *= source_balance_factors(data.labels[tr_idx], data.sources[tr_idx])
        if cfg.balanced_sampler:
            inv = np.where(counts > 0, 1.0 / np.maximum(counts, 1), 0.0)
            sample_p *= inv[data.labels[tr_idx]]
        if sample_weights is not None:
            w = np.asarray(sample_weights, np.float64)
            if w.shape != (len(data),) or np.any(w < 0) or not np.all(np.isfinite(w)):
                raise ValueError("sample_weights must be (N,) finite and ≥ 0")
            sample_p *= w[tr_idx]
        sample_p = sample_p / sample_p.sum()

    def save_checkpoint(epoch: int, stop_reason: str) -> None:
        state = {
            "format": _CHECKPOINT_FORMAT,
            "epoch": epoch,
            "stop_reason": stop_reason,
            "config": json.dumps(cfg.to_dict()),
            "data_fingerprint": data.fingerprint(),
            "class_names": names,
            "mean": mean,
            "std": std,
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "torch_generator": gen.get_state(),
            "numpy_rng": json.dumps(rng.bit_generator.state),
            "torch_rng": torch.get_rng_state(),
            "history": json.dumps(history),
            "best_score": best_score,
            "best_model": best_state if best_state is not None else {},
            "best_epoch": best_epoch,
            "stale": stale,
        }
        tmp = ckpt_path.with_name(ckpt_path.name + ".part")
        torch.save(state, tmp)
        os.replace(tmp, ckpt_path)

    t_train = time.perf_counter()
    epoch_seconds: list[float] = []
    epoch = start_epoch - 1
    for epoch in range(start_epoch, cfg.epochs + 1):
        if done:
            break
        t_ep = time.perf_counter()
        frozen = epoch <= cfg.freeze_epochs
        _set_frozen(model, frozen)
        model.train()
        if frozen:
            head = _head_parameters(model)
            for mod in model.modules():
                if not any(id(p) in head for p in mod.parameters(recurse=False)):
                    mod.eval()  # frozen backbone: batch-norm statistics stay fixed too
        if sample_p is not None:
            order = rng.choice(tr_idx, size=per_epoch, replace=True, p=sample_p)
        else:
            order = rng.permutation(tr_idx)
            while len(order) < per_epoch:
                order = np.concatenate([order, rng.permutation(tr_idx)])
            order = order[:per_epoch]
        # A bar on a terminal only: off a terminal the per-epoch log line is enough.
        bar = Progress(
            total=len(order), desc=f"epoch {epoch}/{cfg.epochs}", unit="crop", enabled=progress and _tty()
        )
        loss_sum = 0.0
        correct = 0
        seen = 0
        for start in range(0, len(order), cfg.batch_size):
            idx = np.sort(order[start : start + cfg.batch_size])
            crops = torch.from_numpy(np.ascontiguousarray(data.crops[idx])).to(device)
            target_t = torch.from_numpy(data.labels[idx]).to(device)
            x = augment_batch(crops, cfg.augment, mpp=data.mpp, generator=gen)
            logits = model(_normalized(x, mean_t, std_t))
            loss = loss_fn(logits, target_t)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            loss_sum += float(loss.detach()) * len(idx)
            correct += int((logits.argmax(dim=1) == target_t).sum())
            seen += len(idx)
            bar.update(len(idx), loss=loss_sum / seen)
        bar.close()
        row: dict[str, Any] = {
            "epoch": epoch,
            "frozen_backbone": frozen,
            "lr": optimizer.param_groups[0]["lr"],
            "train_loss": loss_sum / max(1, seen),
            "train_accuracy": correct / max(1, seen),
        }
        if len(va_idx):
            probs = predict_crops(
                model, data.crops[va_idx], mean=mean, std=std, device=device, batch_size=cfg.eval_batch_size
            )
            y = data.labels[va_idx]
            p_true = np.clip(probs[np.arange(len(y)), y], 1e-7, 1.0)
            row["val_loss"] = float(-np.log(p_true).mean())
            m = evaluate_crops(probs, y, names, abnormal)
            row["val_accuracy"] = m["accuracy"]
            row["val_macro_f1"] = m["macro_f1"]
            row["val_hsil_recall"] = m["hsil"]["recall"]
            row["val_binary_auroc"] = m["needs_review"].get("auroc")
            score = {
                "macro_f1": m["macro_f1"] or 0.0,
                "accuracy": m["accuracy"],
                "loss": -row["val_loss"],
                "binary_auroc": row["val_binary_auroc"] or 0.0,
            }[cfg.monitor]
        else:
            score = float(epoch)  # no validation: keep the last epoch
        row["seconds"] = round(time.perf_counter() - t_ep, 2)
        epoch_seconds.append(row["seconds"])
        improved = score > best_score + 1e-6
        if improved:
            best_score = score
            best_epoch = epoch
            best_state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
            stale = 0
        else:
            stale += 1
        row["best"] = improved
        history.append(row)
        val_text = ""
        if "val_loss" in row:
            val_text = (
                f", val loss {row['val_loss']:.4f}, acc {row['val_accuracy']:.3f}, "
                f"macro F1 {row['val_macro_f1'] or 0:.3f}"
            )
        logger.info(
            "epoch %d/%d: loss %.4f, train acc %.3f%s%s (%.0f s)",
            epoch,
            cfg.epochs,
            row["train_loss"],
            row["train_accuracy"],
            val_text,
            " *" if improved else "",
            row["seconds"],
        )
        reason = "epochs" if epoch == cfg.epochs else ""
        if cfg.patience and len(va_idx) and stale >= cfg.patience:
            logger.info("early stopping: no improvement of val %s for %d epochs", cfg.monitor, stale)
            reason = "early_stop"
        elapsed_min = (time.perf_counter() - t_train) / 60
        if (
            not reason
            and cfg.max_minutes is not None
            and elapsed_min + float(np.mean(epoch_seconds)) / 60 > cfg.max_minutes
        ):
            logger.info("stopping: the next epoch would exceed --max-minutes %.1f", cfg.max_minutes)
            reason = "time"
        save_checkpoint(epoch, reason)
        if reason:
            break

    if best_state is None:
        best_state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        best_epoch = epoch
    model.load_state_dict(best_state)
    model.eval()
    from wsi_screen.models.runicnet import RunicNet

    if isinstance(model, RunicNet):
        model.reparameterize()
        arch_kwargs["deploy"] = True

    # --- export, then evaluate through the pipeline's loader and classifier
    recipe = cfg.to_dict()
    recipe["arch"] = arch
    recipe["arch_kwargs"] = arch_kwargs
    recipe["mean"], recipe["std"] = mean, std
    recipe["sample_weights"] = None if sample_weights is None else "per-crop sampling weights (see data)"
    training = {
        "data": dict(data_description) if data_description is not None else data.describe(),
        "recipe": recipe,
        "init": init_note,
        "class_counts": {k: split_info[k]["class_counts"] for k in ("train", "val", "test")},
        "split": {
            k: {"n": split_info[k]["n"], "n_groups": len(split_info[k]["groups"])}
            for k in ("train", "val", "test")
        },
        "split_file": SPLIT_NAME,
        "seed": cfg.seed,
        "best_epoch": best_epoch,
        "epochs_run": len(history),
        "train_seconds": round(time.perf_counter() - t_train, 1),
        "device": str(device),
        "torch_threads": torch.get_num_threads(),
    }
    bcfg = BundleConfig(
        name=bundle_name,
        version=version,
        task="classification",
        description=description or f"{arch} cell classifier ({', '.join(names)})",
        architecture=arch,
        arch_kwargs=arch_kwargs,
        in_channels=data.channels,
        input_representation=data.representation,
        input_size=data.size,
        mpp=data.mpp,
        mean=mean,
        std=std,
        class_names=names,
        abnormal_classes=abnormal,
        stain_target=StainTarget(mu=target.mu, sigma=target.sigma),
        training=training,
        intended_use=intended_use,
        limitations=limitations,
    )
    saved = save_bundle(model, bcfg, out, half=cfg.half)
    metrics, thresholds = _bundle_metrics(
        saved, data, parts, abnormal, device=device, batch_size=cfg.eval_batch_size
    )
    final_cfg = saved.config.model_copy(update={"metrics": metrics, "thresholds": thresholds})
    _rewrite_config(out, final_cfg)
    write_json(out / SPLIT_NAME, jsonable(split_info), default=None)
    write_json(out / "history.json", jsonable(history), default=None)
    _write_history_csv(work / "history.csv", history)
    from wsi_screen.models.bundle import load_bundle

    bundle = load_bundle(out, task="classification")
    seconds = time.perf_counter() - t_start
    logger.info("bundle %s written to %s in %.0f s", bundle.name, out, seconds)
    return TrainResult(
        bundle=bundle,
        out_dir=out,
        work_dir=work,
        metrics=metrics,
        history=history,
        best_epoch=best_epoch,
        seconds=seconds,
    )


def _bundle_metrics(
    bundle: ModelBundle,
    data: CropSet,
    split: Mapping[str, NDArray[np.intp]],
    abnormal: Sequence[str],
    *,
    device: torch.device,
    batch_size: int,
) -> tuple[dict[str, Any], dict[str, float]]:
    """Validation/test metrics of the saved bundle, run by :class:`CellClassifier` as in screening."""
    import torch

    from wsi_screen.classify import CellClassifier
    from wsi_screen.metrics import headline_metrics

    clf = CellClassifier([bundle], device=device, batch_size=batch_size)
    names = clf.class_names
    metrics: dict[str, Any] = {"computed_by": "CellClassifier on the saved bundle (as in screening)"}
    thresholds: dict[str, float] = {"review_score": 0.5}
    ab_idx = [names.index(c) for c in abnormal]
    for part in ("val", "test"):
        idx = split[part]
        if not len(idx):
            continue
        probs = clf.predict(torch.from_numpy(np.ascontiguousarray(data.crops[idx]))).cpu().numpy()
        m = evaluate_crops(probs, data.labels[idx], names, abnormal)
        metrics[part] = m
        metrics[f"{part}_headline"] = headline_metrics(m)
        if part == "val" and ab_idx:
            score = probs[:, ab_idx].sum(axis=1).astype(np.float64)
            positive = np.isin(data.labels[idx], ab_idx)
            t95 = _threshold_for_sensitivity(score, positive, 0.95)
            if t95 is not None:
                thresholds["review_score_at_95_sensitivity"] = round(t95, 6)
    return metrics, thresholds


def _rewrite_config(out: Path, cfg: Any) -> None:
    from wsi_screen.models.bundle import CONFIG_NAME

    path = out / CONFIG_NAME
    tmp = path.with_name(path.name + ".part")
    tmp.write_text(json.dumps(cfg.model_dump(mode="json"), indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def _write_history_csv(path: Path, history: Sequence[Mapping[str, Any]]) -> None:
    if not history:
        return
    keys = list(dict.fromkeys(k for row in history for k in row))
    with path.open("w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=keys)
        w.writeheader()
        for row in history:
            w.writerow(dict(row))


def copy_config(cfg: TrainConfig, **changes: Any) -> TrainConfig:
    """A copy of ``cfg`` with some fields changed."""
    d = copy.deepcopy(cfg.to_dict())
    d.update(changes)
    return TrainConfig.from_dict(d)


# -- evaluation of bundles on crops ---------------------------------------------------------------------


def evaluate_bundles(
    bundles: Sequence[str | os.PathLike[str]],
    data: CropSet | None,
    *,
    cells: Sequence[ScreenedCells] = (),
    classes: Literal["pooled", "present", "all"] = "pooled",
    device: str = "auto",
    batch_size: int = 128,
) -> dict[str, Any]:
    """Screening metrics of one bundle or an ensemble (probabilities averaged) on labelled crops
    (``data``) and on labelled cells already screened through the pipeline (``cells``,
    :func:`wsi_screen.train.pasted.screen_cells` with the same bundles), pooled.

    Every class of the data must be a class of the bundle(s). With ``classes="pooled"`` (default) the
    metrics are computed over the classes present in the data, each absent bundle class's probability
    added to a present class (:func:`pool_absent_classes`: Herlev has no ASC-US, ASC-H, SCC, AGC,
    organism or artifact: ASC-US counts as LSIL, ASC-H, SCC and AGC as HSIL, organism and artifact as
    NILM), so the summed abnormal probability — the score screening flags and triages by — is the
    bundle's own. ``"present"`` drops the absent classes' columns and renormalizes each row instead
    (the screening score then changes: a NILM cell called ``organism`` counts by its leftover
    classes). How many cells the full arg-max would have put into an absent class is reported in
    ``evaluation.predicted_as_absent``. With ``classes="all"`` every bundle class is kept (a call into
    an absent class counts as an error).
    """
    from wsi_screen.models.bundle import load_bundle

    loaded = [load_bundle(b, task="classification") for b in bundles]
    probs_parts: list[NDArray[np.float32]] = []
    truth_names: list[str] = []
    described: list[dict[str, Any]] = []
    names_all: list[str] = []
    abnormal_all: list[str] = []
    if data is not None and len(data):
        clf = _crop_classifier(loaded, data, device=device, batch_size=batch_size)
        names_all, abnormal_all = list(clf.class_names), list(clf.abnormal_classes)
        probs_parts.append(_crop_probs(clf, data))
        truth_names += [data.class_names[i] for i in data.labels.tolist()]
        described.append(data.describe())
    for part in cells:
        if names_all and part.class_names != names_all:
            raise DataError(f"screened cells in classes {part.class_names}, the bundles' are {names_all}")
        names_all = list(part.class_names)
        probs_parts.append(part.probs)
        truth_names += list(part.labels)
        described.append(
            {
                **part.info,
                "n": len(part),
                "classes": dict(Counter(part.labels)),
                "detected_by_class": {
                    c: int(part.detected[[t == c for t in part.labels]].sum())
                    for c in sorted(set(part.labels))
                },
            }
        )
    if not probs_parts:
        raise DataError("nothing to evaluate: no crops and no screened cells")
    if not abnormal_all:
        abnormal_all = list(loaded[0].config.abnormal_classes)
    unknown = sorted({t for t in truth_names if t not in names_all})
    if unknown:
        raise DataError(
            f"the data has classes {unknown} that {loaded[0].config.name} does not predict "
            f"({', '.join(names_all)}); map them with a class_map"
        )
    probs_all = np.concatenate(probs_parts).astype(np.float32)
    present = [c for c in names_all if c in set(truth_names)]
    absent = [c for c in names_all if c not in present]
    pred_all = np.argmax(probs_all, axis=1)
    predicted_as_absent: dict[str, dict[str, int]] = {}
    for t, p in zip(truth_names, pred_all.tolist(), strict=True):
        if names_all[p] in absent:
            row = predicted_as_absent.setdefault(t, {})
            row[names_all[p]] = row.get(names_all[p], 0) + 1
    pooled_into: dict[str, str] = {}
    if classes == "pooled":
        names = [c for c in names_all if c in present]
        pooled_into = pool_absent_classes(names_all, present, abnormal_all)
        probs = np.zeros((len(probs_all), len(names)), np.float64)
        for k, c in enumerate(names_all):
            into = c if c in names else pooled_into.get(c)
            if into is not None:
                probs[:, names.index(into)] += probs_all[:, k]
        sums = probs.sum(axis=1, keepdims=True)
        probs = np.where(sums > 0, probs / np.maximum(sums, 1e-12), 1.0 / len(names))
    elif classes == "present":
        names = [c for c in names_all if c in present]
        cols = [names_all.index(c) for c in names]
        probs = probs_all[:, cols].astype(np.float64)
        sums = probs.sum(axis=1, keepdims=True)
        probs = np.where(sums > 0, probs / np.maximum(sums, 1e-12), 1.0 / len(names))
    else:
        names = list(names_all)
        probs = probs_all.astype(np.float64)
    y = np.array([names.index(t) for t in truth_names], np.int64)
    abnormal = [c for c in abnormal_all if c in names]
    metrics = evaluate_crops(probs, y, names, abnormal)
    metrics["evaluation"] = {
        "models": [{"name": b.name, "sha256": b.identity_sha256, "path": str(b.path)} for b in loaded],
        "ensemble": len(loaded) > 1,
        "class_mode": classes,
        "bundle_classes": list(names_all),
        "absent_classes": absent,
        "rule": {
            "pooled": "metrics over the classes present in the data: each absent bundle class's probability "
            "added to a present class (pooled_into: an abnormal class into a present abnormal class of its "
            "triage group, else the most severe present one; any other into the present negative class), so "
            "the summed abnormal probability, the screening score, is the bundle's own",
            "present": "metrics over the classes present in the data: probabilities of absent bundle classes "
            "dropped, rows renormalized",
            "all": "metrics over every bundle class",
        }[classes],
        "pooled_into": pooled_into,
        "n_predicted_as_absent": int(sum(sum(r.values()) for r in predicted_as_absent.values())),
        "predicted_as_absent": predicted_as_absent,
        "data": described[0] if len(described) == 1 else {"parts": described},
    }
    if cells:
        det = np.concatenate([c.detected for c in cells])
        truth = np.array([t for c in cells for t in c.labels], dtype=str)
        metrics["evaluation"]["screened_cells"] = {
            "n": len(det),
            "detected": int(det.sum()),
            "detected_by_class": {
                c: [int(det[truth == c].sum()), int((truth == c).sum())]
                for c in names_all
                if (truth == c).any()
            },
            "rule": "cells pasted into slides and cut by the pipeline; a cell's probabilities are those of "
            "its most abnormal detection; an undetected cell counts as a negative call",
        }
    return metrics


#: Triage groups of the abnormal classes (``triage.review_categories`` / ``priority_categories``),
#: least to most severe: an absent abnormal class is pooled into a present class of its group.
POOL_GROUPS: tuple[tuple[str, ...], ...] = (("ASC-US", "LSIL"), ("ASC-H", "AGC", "HSIL", "SCC"))


def pool_absent_classes(
    class_names: Sequence[str], present: Sequence[str], abnormal: Sequence[str]
) -> dict[str, str]:
    """Where each bundle class absent from the data is counted (``evaluate_bundles(classes="pooled")``).

    An absent abnormal class goes to the most severe present abnormal class of its triage group
    (:data:`POOL_GROUPS`), else to the most severe present abnormal class; an absent class that is not
    abnormal (organism, endocervical, artifact) goes to NILM when present, else to the first present
    class that is not abnormal. A class with nowhere to go (no present class of its kind) is left out.
    """
    order = [c for group in POOL_GROUPS for c in group]

    def severity(c: str) -> int:
        return order.index(c) if c in order else -1

    present_abn = sorted((c for c in present if c in abnormal), key=severity)
    present_neg = [c for c in present if c not in abnormal]
    neg_target = "NILM" if "NILM" in present_neg else (present_neg[0] if present_neg else None)
    out: dict[str, str] = {}
    for c in class_names:
        if c in present:
            continue
        if c in abnormal:
            group = next((g for g in POOL_GROUPS if c in g), ())
            same = [p for p in present_abn if p in group]
            target = same[-1] if same else (present_abn[-1] if present_abn else None)
        else:
            target = neg_target
        if target is not None:
            out[c] = target
    return out


def _crop_classifier(
    loaded: Sequence[ModelBundle], data: CropSet, *, device: str, batch_size: int
) -> CellClassifier:
    """The classifier for ``data``, after checking that the crops fit it (one line each)."""
    from wsi_screen.classify import CellClassifier
    from wsi_screen.runtime import resolve_device

    dev = resolve_device(device, setting="device")
    clf = CellClassifier(loaded, device=dev, batch_size=batch_size)
    cfg = loaded[0].config
    if clf.morphometrics:
        raise DataError(
            f"{' + '.join(clf.names)} has a score head that needs the localizer's nucleus measurements "
            f"({', '.join(clf.morphometrics)}), which crops alone do not carry; evaluate crop folders "
            "with cut='pipeline' (wsi-screen evaluate --cut pipeline) or screen slides of the cells"
        )
    if data.size != clf.input_size or not math.isclose(data.mpp, clf.mpp, rel_tol=1e-3):
        raise DataError(
            f"the crops are {data.size} px at {data.mpp} µm/px; {cfg.name} needs {clf.input_size} px at "
            f"{clf.mpp} µm/px (cut the crops at that target_mpp and size, or use the raw crops)"
        )
    if data.channels != clf.in_channels:
        raise DataError(
            f"the crops are {data.representation}; {cfg.name} takes {clf.input_representation} crops "
            "(rgb+mask crops come from annotations or synthetic slides, cut with the localizer)"
        )
    present = data.present_classes()
    unknown = [c for c in present if c not in clf.class_names]
    if unknown:
        raise DataError(
            f"the data has classes {unknown} that {cfg.name} does not predict "
            f"({', '.join(clf.class_names)}); map them with a class_map"
        )
    return clf


def _crop_probs(clf: CellClassifier, data: CropSet) -> NDArray[np.float32]:
    import torch

    probs_all = np.zeros((len(data), len(clf.class_names)), np.float32)
    for start in range(0, len(data), 1024):
        chunk = torch.from_numpy(np.ascontiguousarray(data.crops[start : start + 1024]))
        probs_all[start : start + len(chunk)] = clf.predict(chunk).cpu().numpy()
    return probs_all
