"""Papanicolaou stain and scanner colour profiles for the synthetic slides.

Colours are modelled in optical density (Beer–Lambert): a stain layer of thickness ``t`` transmits
``exp(-t * od)`` of the light in each RGB channel, so overlapping cells darken naturally. A profile
holds one OD vector per dye (natural-log OD per unit thickness), the glass colour and a per-channel
scanner response (gain and gamma applied to the final 8-bit image).
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import numpy as np

__all__ = ["DYES", "STAIN_PROFILES", "StainProfile", "get_stain_profile"]

RGB = tuple[float, float, float]

#: Dye names a cell's cytoplasm or nucleus can be stained with.
DYES: tuple[str, ...] = ("cyan", "pink", "orange", "pale", "nucleus", "debris", "mucus")


@dataclass(frozen=True)
class StainProfile:
    """Colours of one stain batch + scanner (all OD vectors: natural log, per unit thickness)."""

    name: str
    glass_rgb: RGB = (240.0, 238.0, 242.0)
    #: Light Green SF: cyanophilic (blue-green) cytoplasm.
    cyan: RGB = (0.38, 0.16, 0.145)
    #: Eosin Y: eosinophilic (pink) cytoplasm.
    pink: RGB = (0.045, 0.3, 0.235)
    #: Orange G: orangeophilic (keratinised) cytoplasm.
    orange: RGB = (0.05, 0.32, 0.66)
    #: Faint cytoplasm of inflammatory cells.
    pale: RGB = (0.10, 0.13, 0.09)
    #: Hematoxylin (nuclei).
    nucleus: RGB = (0.95, 1.00, 0.60)
    #: Amorphous debris (brownish grey).
    debris: RGB = (0.34, 0.44, 0.55)
    #: Mucus strands (faint blue-grey).
    mucus: RGB = (0.16, 0.09, 0.06)
    #: Overall multipliers of cytoplasm and nucleus OD.
    cyto_scale: float = 1.0
    nucleus_scale: float = 1.0
    #: Added to the probability that a squamous cell is eosinophilic (pink/orange) instead of cyan.
    pink_bias: float = 0.0
    #: Scanner response per channel: out = 255 * gain * (in / 255) ** gamma.
    gain: RGB = (1.0, 1.0, 1.0)
    gamma: RGB = (1.0, 1.0, 1.0)
    #: Sensor noise (grey levels, standard deviation).
    noise_sigma: float = 1.4

    def dye(self, name: str) -> np.ndarray:
        """OD vector (3,) of a dye, with the profile's scale applied."""
        if name not in DYES:
            raise ValueError(f"unknown dye {name!r}; choose one of: {', '.join(DYES)}")
        scale = self.nucleus_scale if name == "nucleus" else self.cyto_scale
        return np.asarray(getattr(self, name), dtype=np.float32) * np.float32(scale)

    def jittered(self, rng: np.random.Generator, amount: float) -> StainProfile:
        """A randomly perturbed copy (``amount`` ≈ relative standard deviation of each OD value)."""
        if amount <= 0:
            return self
        changes: dict[str, object] = {}
        for f in fields(self):
            if f.name in DYES:
                vec = np.asarray(getattr(self, f.name), dtype=np.float64)
                common = rng.lognormal(0.0, amount)
                per_channel = rng.lognormal(0.0, amount / 2.0, size=3)
                changes[f.name] = _rgb(vec * common * per_channel)
        glass = np.asarray(self.glass_rgb) + rng.normal(0.0, 20.0 * amount, size=3)
        changes["glass_rgb"] = _rgb(np.clip(glass, 225.0, 252.0))
        changes["pink_bias"] = float(self.pink_bias + rng.normal(0.0, amount))
        return replace(self, **changes)  # type: ignore[arg-type]

    def scanner_lut(self) -> np.ndarray:
        """(3, 256) uint8 lookup table of the scanner response."""
        x = np.arange(256, dtype=np.float64) / 255.0
        lut = np.empty((3, 256), dtype=np.uint8)
        for c in range(3):
            lut[c] = np.clip(np.rint(255.0 * self.gain[c] * x ** self.gamma[c]), 0, 255)
        return lut

    @property
    def is_identity_scanner(self) -> bool:
        """True when the scanner response is the identity (its LUT can be skipped)."""
        return self.gain == (1.0, 1.0, 1.0) and self.gamma == (1.0, 1.0, 1.0)


def _rgb(v: np.ndarray) -> RGB:
    return float(v[0]), float(v[1]), float(v[2])


#: Named profiles: stain batches (pale, dark, blue, pink) and a second scanner (``scanner_b``).
STAIN_PROFILES: dict[str, StainProfile] = {
    "default": StainProfile("default"),
    "pale": StainProfile("pale", glass_rgb=(244.0, 243.0, 245.0), cyto_scale=0.62, nucleus_scale=0.72),
    "dark": StainProfile("dark", glass_rgb=(233.0, 231.0, 236.0), cyto_scale=1.45, nucleus_scale=1.3),
    "blue": StainProfile(
        "blue",
        glass_rgb=(235.0, 239.0, 247.0),
        cyan=(0.50, 0.16, 0.10),
        nucleus=(1.05, 0.98, 0.45),
        pink_bias=-0.25,
    ),
    "pink": StainProfile(
        "pink",
        glass_rgb=(245.0, 236.0, 241.0),
        pink=(0.06, 0.46, 0.30),
        nucleus=(0.85, 1.02, 0.62),
        pink_bias=0.3,
    ),
    "scanner_b": StainProfile(
        "scanner_b",
        glass_rgb=(247.0, 243.0, 231.0),
        gain=(1.0, 0.99, 0.97),
        gamma=(0.92, 1.0, 1.12),
        noise_sigma=2.2,
    ),
}


def get_stain_profile(stain: str | StainProfile) -> StainProfile:
    """Resolve a profile name (or pass a profile through)."""
    if isinstance(stain, StainProfile):
        return stain
    try:
        return STAIN_PROFILES[stain]
    except KeyError:
        raise ValueError(
            f"unknown stain profile {stain!r}; choose one of: {', '.join(STAIN_PROFILES)}"
        ) from None
