"""Self-supervised pre-training of a classifier backbone on unlabelled cell crops (SimCLR).

No ImageNet weights exist here, and labelled real cells are few; unlabelled crops of the training
fields are not. :func:`pretrain_ssl` learns a backbone from them with SimCLR (Chen et al. 2020): two
augmented views of each crop, a small projection head, and the NT-Xent loss, which pulls the two
views of a crop together and pushes the other crops of the batch away. The result is a
**backbone bundle** (``inference.backbone_only``): ``wsi-screen train classifier --init BUNDLE``
starts a classifier from it (new head), and the pipeline refuses to screen with it.

Views: a random resized crop (a share ``min_scale``–1 of the crop's area, aspect 3/4–4/3, one of
the 8 flips/rotations) resampled to ``view_size`` px, then the colour, optics and JPEG part of
:mod:`wsi_screen.train.augment` (its geometry is this module's). Views are smaller than the 224²
crops (160² by default) so a CPU step costs what a supervised step does; the classifier is then
trained at its own size.

Only crops of the training part belong here: the validation and test crops must stay unseen, even
unlabelled.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from numpy.typing import NDArray

from wsi_screen.errors import WsiScreenError
from wsi_screen.train.augment import AugmentConfig

if TYPE_CHECKING:
    import torch
    from torch import nn

    from wsi_screen.models.bundle import ModelBundle
    from wsi_screen.stain import ReinhardStats
    from wsi_screen.train.data import CropSet

__all__ = ["BACKBONE_CLASS", "SSLConfig", "SSLError", "nt_xent_loss", "pretrain_ssl", "simclr_views"]

logger = logging.getLogger(__name__)

#: The single placeholder class of a backbone bundle (its head is zero; never used to screen).
BACKBONE_CLASS = "backbone"
CHECKPOINT_NAME = "ssl-last.pt"
_CHECKPOINT_FORMAT = 1


class SSLError(WsiScreenError, RuntimeError):
    """Self-supervised pre-training cannot start or continue (one-line message)."""


def _colour_only(cfg: AugmentConfig) -> AugmentConfig:
    return replace(cfg, flips=False, scale=0.0, shift_um=0.0)


@dataclass(frozen=True)
class SSLConfig:
    """Everything that defines a SimCLR run (recorded in the bundle as ``training.recipe``)."""

    arch: str = "mobilenetv3_small_100"
    epochs: int = 12
    batch_size: int = 64
    lr: float = 2e-3
    weight_decay: float = 0.05
    warmup_epochs: float = 1.0
    temperature: float = 0.2
    proj_dim: int = 128
    hidden_dim: int = 512
    view_size: int = 160
    min_scale: float = 0.35
    augment: AugmentConfig = field(default_factory=lambda: _colour_only(AugmentConfig.strong()))
    samples_per_epoch: int | None = None
    seed: int = 0
    device: str = "auto"
    threads: int = 0
    max_minutes: float | None = None
    half: bool = False

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise ValueError(f"epochs must be ≥ 1, got {self.epochs}")
        if self.batch_size < 2:
            raise ValueError(f"batch_size must be ≥ 2 (a batch holds the negatives), got {self.batch_size}")
        if self.lr <= 0 or self.temperature <= 0:
            raise ValueError(f"lr and temperature must be positive, got {self.lr}, {self.temperature}")
        if not 0.05 <= self.min_scale <= 1.0:
            raise ValueError(f"min_scale must lie in [0.05, 1], got {self.min_scale}")
        if self.view_size < 32:
            raise ValueError(f"view_size must be ≥ 32 px, got {self.view_size}")
        if self.proj_dim < 1 or self.hidden_dim < 1:
            raise ValueError("proj_dim and hidden_dim must be ≥ 1")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["augment"] = self.augment.to_dict()
        return d

    def defining(self) -> dict[str, Any]:
        """The fields a resumed run must share (not where or how long it runs)."""
        return {k: v for k, v in self.to_dict().items() if k not in ("device", "threads", "max_minutes")}


def nt_xent_loss(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> torch.Tensor:
    """SimCLR's NT-Xent loss of two (N, D) batches of projections, row i of each the same crop.

    Each of the 2N views must pick its partner out of the other 2N − 2 views plus it, by cosine
    similarity / ``temperature`` (cross-entropy over the 2N − 1 others).
    """
    import torch
    import torch.nn.functional as F

    if z1.shape != z2.shape or z1.ndim != 2 or z1.shape[0] < 2:
        raise ValueError(
            f"need two (N ≥ 2, D) batches of the same shape, got {tuple(z1.shape)}, {tuple(z2.shape)}"
        )
    n = z1.shape[0]
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    sim = z @ z.T / temperature
    sim = sim.masked_fill(torch.eye(2 * n, dtype=torch.bool, device=z.device), float("-inf"))
    target = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(z.device)
    return F.cross_entropy(sim, target)


def simclr_views(
    crops: torch.Tensor, cfg: SSLConfig, *, mpp: float, generator: torch.Generator
) -> torch.Tensor:
    """One augmented view of each uint8 (N, H, W, 3) crop: float (N, 3, view, view) grey levels."""
    import torch
    import torch.nn.functional as F

    from wsi_screen.train.augment import augment_batch

    x = augment_batch(crops, cfg.augment, mpp=mpp, generator=generator)  # colour, optics, JPEG
    n = x.shape[0]
    area = torch.rand(n, generator=generator, dtype=torch.float64) * (1.0 - cfg.min_scale) + cfg.min_scale
    log_r = (torch.rand(n, generator=generator, dtype=torch.float64) * 2 - 1) * math.log(4.0 / 3.0)
    ratio = torch.exp(log_r)
    sx = torch.clamp(torch.sqrt(area * ratio), max=1.0)  # half-widths in normalized coordinates
    sy = torch.clamp(torch.sqrt(area / ratio), max=1.0)
    cx = (torch.rand(n, generator=generator, dtype=torch.float64) * 2 - 1) * (1.0 - sx)
    cy = (torch.rand(n, generator=generator, dtype=torch.float64) * 2 - 1) * (1.0 - sy)
    k = torch.randint(0, 4, (n,), generator=generator).double() * (math.pi / 2)
    fx = 1.0 - 2.0 * torch.randint(0, 2, (n,), generator=generator).double()
    cos, sin = torch.cos(k).round(), torch.sin(k).round()
    theta = torch.zeros(n, 2, 3, dtype=torch.float64)
    theta[:, 0, 0] = cos * fx * sx
    theta[:, 0, 1] = -sin * sy
    theta[:, 1, 0] = sin * fx * sx
    theta[:, 1, 1] = cos * sy
    theta[:, 0, 2] = cx
    theta[:, 1, 2] = cy
    size = [n, x.shape[1], cfg.view_size, cfg.view_size]
    grid = F.affine_grid(theta.to(x.dtype).to(x.device), size, align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


class _SimCLR:
    """Backbone (its classifier removed) + projection head; a plain holder, not an nn.Module."""

    def __init__(self, cfg: SSLConfig, in_chans: int) -> None:
        import torch
        from torch import nn

        from wsi_screen.models.registry import create_model

        self.backbone = create_model(cfg.arch, num_classes=1, in_chans=in_chans)
        reset = getattr(self.backbone, "reset_classifier", None)
        if reset is None:
            raise SSLError(f"architecture {cfg.arch!r} has no reset_classifier(): use a timm model")
        reset(0)
        with torch.no_grad():
            self.backbone.eval()
            dim = int(self.backbone(torch.zeros(2, in_chans, 64, 64)).shape[1])
        self.feature_dim = dim
        self.projector = nn.Sequential(
            nn.Linear(dim, cfg.hidden_dim),
            nn.BatchNorm1d(cfg.hidden_dim),
            nn.ReLU(inplace=True),
            nn.Linear(cfg.hidden_dim, cfg.proj_dim),
        )

    def modules(self) -> list[nn.Module]:
        return [self.backbone, self.projector]

    def parameters(self) -> list[torch.nn.Parameter]:
        return [p for m in self.modules() for p in m.parameters()]


def pretrain_ssl(
    data: CropSet,
    out_dir: str | Path,
    *,
    config: SSLConfig | None = None,
    indices: NDArray[np.intp] | None = None,
    name: str | None = None,
    work_dir: str | Path | None = None,
    resume: bool = False,
    progress: bool = True,
    description: str = "",
    stain_target: ReinhardStats | None = None,
) -> ModelBundle:
    """Pre-train a backbone on ``data``'s crops (labels ignored) and write a backbone bundle.

    Args:
        indices: the crops to learn from (default: all). Pass the training part only.
        stain_target: the Reinhard target the crops were normalized to (default
            :data:`wsi_screen.stain.DEFAULT_TARGET`), recorded in the bundle.
        work_dir: checkpoints (``ssl-last.pt`` after every epoch; default ``OUT.train``);
            ``resume=True`` continues from it.
    """
    import torch

    from wsi_screen.models.bundle import BundleConfig, StainTarget, save_bundle
    from wsi_screen.models.registry import create_model
    from wsi_screen.stain import DEFAULT_TARGET
    from wsi_screen.train.classifier import _dataset_mean_std, _lr_factor
    from wsi_screen.train.common import Progress, resolve_training_device, seed_everything

    cfg = config or SSLConfig()
    out = Path(out_dir)
    work = Path(work_dir) if work_dir is not None else out.with_name(out.name + ".train")
    if data.channels != 3:
        raise SSLError(f"self-supervised pre-training takes RGB crops, got {data.representation}")
    idx = np.arange(len(data), dtype=np.intp) if indices is None else np.asarray(indices, np.intp)
    if len(idx) < cfg.batch_size:
        raise SSLError(f"{len(idx)} crops are fewer than one batch ({cfg.batch_size}): lower --batch-size")
    if idx.min() < 0 or idx.max() >= len(data):
        raise SSLError(f"indices out of range for {len(data)} crops")
    rng = seed_everything(cfg.seed, deterministic=False)
    device = resolve_training_device(cfg.device, threads=cfg.threads)
    model = _SimCLR(cfg, data.channels)
    for m in model.modules():
        m.to(device)
    mean, std = _dataset_mean_std(data.crops, idx, cfg.seed)
    mean_t = torch.tensor(mean, device=device).view(1, -1, 1, 1) * 255.0
    std_t = torch.tensor(std, device=device).view(1, -1, 1, 1) * 255.0
    per_epoch = cfg.samples_per_epoch or len(idx)
    steps_per_epoch = max(1, per_epoch // cfg.batch_size)
    total = steps_per_epoch * cfg.epochs
    warmup = round(cfg.warmup_epochs * steps_per_epoch)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)

    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: _lr_factor(step, warmup=warmup, total=total)
    )
    gen = torch.Generator().manual_seed(cfg.seed)
    history: list[dict[str, Any]] = []
    start_epoch = 1
    ckpt_path = work / CHECKPOINT_NAME
    if resume and ckpt_path.is_file():
        ckpt = torch.load(ckpt_path, map_location=device, weights_only=False)
        if ckpt.get("format") != _CHECKPOINT_FORMAT or ckpt.get("recipe") != cfg.defining():
            raise SSLError(f"{ckpt_path} was written by another recipe: delete it or pass another --work-dir")
        model.backbone.load_state_dict(ckpt["backbone"])
        model.projector.load_state_dict(ckpt["projector"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        gen.set_state(ckpt["generator"])
        rng.bit_generator.state = ckpt["numpy_rng"]
        history = list(ckpt["history"])
        start_epoch = int(ckpt["epoch"]) + 1
        logger.info("resumed self-supervised pre-training after epoch %d", start_epoch - 1)
    t0 = time.perf_counter()
    stop_reason = "epochs done"
    for epoch in range(start_epoch, cfg.epochs + 1):
        for m in model.modules():
            m.train()
        order = rng.permutation(idx)
        while len(order) < steps_per_epoch * cfg.batch_size:
            order = np.concatenate([order, rng.permutation(idx)])
        bar = Progress(
            total=steps_per_epoch, desc=f"ssl epoch {epoch}/{cfg.epochs}", unit="step", enabled=progress
        )
        loss_sum, top1, seen, t_ep = 0.0, 0, 0, time.perf_counter()
        for step in range(steps_per_epoch):
            take = np.sort(order[step * cfg.batch_size : (step + 1) * cfg.batch_size])
            crops = torch.from_numpy(np.ascontiguousarray(data.crops[take])).to(device)
            v1 = simclr_views(crops, cfg, mpp=data.mpp, generator=gen)
            v2 = simclr_views(crops, cfg, mpp=data.mpp, generator=gen)
            x = (torch.cat([v1, v2]) - mean_t) / std_t
            z = model.projector(model.backbone(x))
            z1, z2 = z[: len(take)], z[len(take) :]
            loss = nt_xent_loss(z1, z2, cfg.temperature)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()  # type: ignore[no-untyped-call]
            optimizer.step()
            scheduler.step()
            with torch.no_grad():  # the share of views whose most similar other view is their partner
                zn = torch.nn.functional.normalize(z.detach(), dim=1)
                sim = (zn @ zn.T).fill_diagonal_(-2.0)
                partner = torch.cat([torch.arange(len(take), 2 * len(take)), torch.arange(0, len(take))])
                top1 += int((sim.argmax(dim=1).cpu() == partner).sum())
            loss_sum += float(loss.detach()) * len(take)
            seen += len(take)
            bar.update(1, loss=loss_sum / seen)
        bar.close()
        row = {
            "epoch": epoch,
            "lr": optimizer.param_groups[0]["lr"],
            "loss": loss_sum / max(1, seen),
            "pair_top1": top1 / max(1, 2 * seen),
            "seconds": round(time.perf_counter() - t_ep, 1),
        }
        history.append(row)
        logger.info(
            "ssl epoch %d/%d: NT-Xent %.3f, partner found %.3f (%.0f s)",
            epoch,
            cfg.epochs,
            row["loss"],
            row["pair_top1"],
            row["seconds"],
        )
        work.mkdir(parents=True, exist_ok=True)
        tmp = ckpt_path.with_suffix(".tmp")
        torch.save(
            {
                "format": _CHECKPOINT_FORMAT,
                "recipe": cfg.defining(),
                "epoch": epoch,
                "backbone": model.backbone.state_dict(),
                "projector": model.projector.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "generator": gen.get_state(),
                "numpy_rng": rng.bit_generator.state,
                "history": history,
            },
            tmp,
        )
        tmp.replace(ckpt_path)
        if cfg.max_minutes is not None and (time.perf_counter() - t0) / 60.0 >= cfg.max_minutes:
            stop_reason = f"time limit ({cfg.max_minutes:g} min) after epoch {epoch}"
            break
    logger.info("self-supervised pre-training stopped: %s", stop_reason)

    # --- export: the backbone in a one-class classifier whose head is zero
    export = create_model(cfg.arch, num_classes=1, in_chans=data.channels)
    missing, unexpected = export.load_state_dict(model.backbone.state_dict(), strict=False)
    head = {n for n, _ in export.named_parameters()} - set(model.backbone.state_dict())
    if unexpected or set(missing) - head:
        raise SSLError(f"architecture {cfg.arch!r}: the backbone does not fit its classifier form")
    with torch.no_grad():
        for n, p in export.named_parameters():
            if n in head:
                p.zero_()
    target = DEFAULT_TARGET if stain_target is None else stain_target
    bcfg = BundleConfig(
        name=name or out.name,
        task="classification",
        description=description
        or f"{cfg.arch} backbone pre-trained self-supervised (SimCLR) on {len(idx)} unlabelled crops",
        architecture=cfg.arch,
        in_channels=data.channels,
        input_representation=data.representation,
        input_size=data.size,
        mpp=data.mpp,
        mean=mean,
        std=std,
        class_names=[BACKBONE_CLASS],
        stain_target=StainTarget(mu=target.mu, sigma=target.sigma),
        inference={"backbone_only": True},
        training={
            "method": "SimCLR (NT-Xent), unlabelled crops",
            "recipe": cfg.to_dict(),
            "crops": len(idx),
            "data": data.describe(),
            "history": history,
            "stop_reason": stop_reason,
            "train_seconds": round(time.perf_counter() - t0, 1),
            "device": str(device),
            "torch_threads": torch.get_num_threads(),
        },
        intended_use="Initial weights for `wsi-screen train classifier --init`; never for screening.",
        limitations="A backbone without a classifier: it predicts nothing.",
    )
    return save_bundle(export, bcfg, out, half=cfg.half)
