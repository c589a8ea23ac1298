"""Synthetic demo sites with a known AGB–band relation.

Every field is a continuous function of longitude and latitude (a sum of random plane waves),
so rasters on different grids and CRSs sample the same landscape and can be aligned. AGB is a
sensor-visible part times a spatially smooth factor no sensor sees (like wood density), so the
residuals of any model are spatially autocorrelated, as on real sites.

The three sites exercise what real data throws at the toolkit:

``alpha``
    Satellite and AGB on the same EPSG:4326 grid, float32, bands named in the file, cloud holes.
``beta``
    Satellite on a UTM 30 m grid, float64, nodata -9999 (tagged), AGB on EPSG:4326 ~40 m.
``gamma``
    Same grid, no band descriptions (names given in the config), AGB 0 outside an irregular
    footprint with no nodata tag.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import rasterio
import yaml
from pyproj import Transformer
from rasterio.transform import from_origin

__all__ = [
    "DEMO_BANDS",
    "config_yaml",
    "demo_config",
    "make_demo_sites",
    "synthetic_stack",
    "write_demo",
]

#: The demo stack's bands: two Sentinel-2 seasons, Sentinel-1, PALSAR-2, terrain and height.
DEMO_BANDS: tuple[str, ...] = (
    *(f"{b}_{t}" for t in ("T1", "T2") for b in ("B2", "B3", "B4", "B8", "B11", "B12")),
    "VV_T1",
    "VH_T1",
    "PAL_HH",
    "PAL_HV",
    "dem",
    "slope",
    "CH",
)

_PIXEL_DEG = 0.000359326  # ~40 m, as the benchmark maps


@dataclass(frozen=True)
class Field:
    """A smooth random field: sum of plane waves with wavelengths in metres."""

    kx: np.ndarray
    ky: np.ndarray
    phase: np.ndarray
    amp: np.ndarray

    @classmethod
    def random(
        cls, rng: np.random.Generator, *, n: int = 24, min_m: float = 400, max_m: float = 4000
    ) -> Field:
        wavelength = np.exp(rng.uniform(np.log(min_m), np.log(max_m), n))
        theta = rng.uniform(0, np.pi, n)
        k = 2 * np.pi / wavelength
        amp = wavelength / wavelength.sum()  # more power at long wavelengths
        return cls(k * np.cos(theta), k * np.sin(theta), rng.uniform(0, 2 * np.pi, n), amp)

    def __call__(self, x_m: np.ndarray, y_m: np.ndarray) -> np.ndarray:
        arg = x_m[..., None] * self.kx + y_m[..., None] * self.ky + self.phase
        out = (np.cos(arg) * self.amp).sum(-1)
        return out / np.sqrt((self.amp**2).sum() / 2)  # ~unit variance


@dataclass(frozen=True)
class Landscape:
    lon0: float
    lat0: float
    visible: Field
    hidden: Field
    terrain: Field
    agb_scale: float

    def metres(self, lon: np.ndarray, lat: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Local east/north metres from the site origin (equirectangular, fine at site scale)."""
        x = (lon - self.lon0) * 111_320.0 * np.cos(np.radians(self.lat0))
        y = (lat - self.lat0) * 110_540.0
        return x, y

    def agb(self, lon: np.ndarray, lat: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(total AGB, sensor-visible AGB) in Mg/ha."""
        x, y = self.metres(lon, lat)
        visible = self.agb_scale * np.exp(0.45 * self.visible(x, y))
        return visible * (1.0 + 0.15 * np.tanh(self.hidden(x, y))), visible


def synthetic_stack(
    landscape: Landscape,
    lon: np.ndarray,
    lat: np.ndarray,
    rng: np.random.Generator,
    *,
    noise: float = 1.0,
) -> np.ndarray:
    """The demo bands (``DEMO_BANDS`` order) at the given points, from the visible AGB.

    Optical reflectance and C-band saturate early, L-band and canopy height later, as in the
    benchmark's forward model.
    """
    _, v = landscape.agb(lon, lat)
    x, y = landscape.metres(lon, lat)
    dem = 400 + 120 * landscape.terrain(x, y)
    slope = np.clip(12 + 6 * landscape.terrain(y, x), 0, 60)

    def sat(scale: float) -> np.ndarray:
        return 1 - np.exp(-v / scale)

    def jitter(sd: float) -> np.ndarray:
        return rng.normal(0, sd * noise, v.shape)

    bands = []
    for season_gain in (1.0, 0.8):
        bands += [
            300 + 200 * (1 - sat(60)) + jitter(15),  # B2
            550 + 250 * (1 - sat(70)) + jitter(20),  # B3
            250 + 900 * (1 - sat(50)) * season_gain + jitter(25),  # B4
            1800 + 1800 * sat(90) * season_gain + jitter(60),  # B8
            2400 - 900 * sat(110) + jitter(50),  # B11
            1700 - 900 * sat(100) + jitter(45),  # B12
        ]
    bands += [
        -13 + 5 * sat(70) + jitter(0.5),  # VV dB
        -21 + 7 * sat(110) + jitter(0.6),  # VH dB
        np.sqrt(10 ** ((-9 + 3 * sat(150) + 83 + jitter(0.4)) / 10)),  # PAL_HH DN
        np.sqrt(10 ** ((-18 + 8 * sat(200) + 83 + jitter(0.5)) / 10)),  # PAL_HV DN
        dem,
        slope,
        np.clip(38 * sat(220) + jitter(1.5), 0, None),  # canopy height, m
    ]
    return np.stack(bands).astype(np.float64)


SITES = {
    "alpha": dict(lon0=80.10, lat0=22.30, scale=140.0),
    "beta": dict(lon0=77.40, lat0=21.90, scale=90.0),
    "gamma": dict(lon0=101.35, lat0=14.45, scale=240.0),
}


def site_grid(lon0: float, lat0: float, size_px: int) -> tuple[np.ndarray, np.ndarray, object]:
    transform = from_origin(lon0, lat0, _PIXEL_DEG, _PIXEL_DEG)
    cols, rows = np.meshgrid(np.arange(size_px) + 0.5, np.arange(size_px) + 0.5)
    lon = lon0 + cols * _PIXEL_DEG
    lat = lat0 - rows * _PIXEL_DEG
    return lon, lat, transform


def _write(path: Path, data: np.ndarray, *, crs: str, transform: object, **profile) -> None:
    descriptions = profile.pop("descriptions", None)
    dtype = profile.pop("dtype", data.dtype)
    with rasterio.open(
        path,
        "w",
        driver="GTiff",
        height=data.shape[1],
        width=data.shape[2],
        count=data.shape[0],
        dtype=dtype,
        crs=crs,
        transform=transform,
        tiled=True,
        blockxsize=128,
        blockysize=128,
        compress="deflate",
        **profile,
    ) as dst:
        dst.write(data.astype(dtype))
        if descriptions:
            for i, name in enumerate(descriptions, start=1):
                dst.set_band_description(i, name)


def make_demo_sites(directory: str | Path, *, size_px: int = 160, seed: int = 0) -> list[dict]:
    """Write the three demo sites' rasters into ``directory``.

    Parameters
    ----------
    directory : str or Path
        Output folder (created).
    size_px : int
        AGB map side in pixels (~40 m each).
    seed : int
        Seed of the landscapes and noise.

    Returns
    -------
    list of dict
        One ``sites:`` entry per site (absolute paths), ready for a config.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    entries = []
    for name, spec in SITES.items():
        land = Landscape(
            spec["lon0"],
            spec["lat0"],
            Field.random(rng),
            Field.random(rng, min_m=600, max_m=3000),
            Field.random(rng, min_m=800, max_m=6000),
            spec["scale"],
        )
        lon, lat, transform = site_grid(spec["lon0"], spec["lat0"], size_px)
        agb, _ = land.agb(lon, lat)
        sat_path = directory / f"{name}_satellite.tif"
        agb_path = directory / f"{name}_biomass.tif"
        entry: dict = {"name": name, "satellite": str(sat_path), "biomass": str(agb_path)}
        if name == "beta":
            # A UTM 30 m stack covering the AGB map with a margin; float64, -9999 for nodata.
            epsg = 32600 + int((spec["lon0"] + 180) // 6) + 1
            to_utm = Transformer.from_crs("EPSG:4326", f"EPSG:{epsg}", always_xy=True)
            x0, y1 = to_utm.transform(spec["lon0"] - 0.002, spec["lat0"] + 0.002)
            n = int(size_px * 40 / 30) + 30
            ux, uy = np.meshgrid(x0 + (np.arange(n) + 0.5) * 30, y1 - (np.arange(n) + 0.5) * 30)
            slon, slat = to_utm.transform(ux, uy, direction="INVERSE")
            stack = synthetic_stack(land, slon, slat, rng)
            gaps = holes(rng, stack.shape[1:], frac=0.03)
            stack[:, gaps] = -9999.0
            _write(
                sat_path,
                stack,
                crs=f"EPSG:{epsg}",
                transform=from_origin(x0, y1, 30, 30),
                dtype="float64",
                nodata=-9999.0,
                descriptions=DEMO_BANDS,
            )
        else:
            stack = synthetic_stack(land, lon, lat, rng)
            stack[:12, holes(rng, stack.shape[1:], frac=0.04)] = np.nan  # clouds in optical
            _write(
                sat_path,
                stack,
                crs="EPSG:4326",
                transform=transform,
                dtype="float32",
                descriptions=None if name == "gamma" else DEMO_BANDS,
            )
            if name == "gamma":
                entry["bands"] = list(DEMO_BANDS)
        if name == "gamma":
            # An irregular LiDAR footprint: 0 outside, no nodata tag (like the benchmark maps).
            dx, dy = (lon - lon.mean()) / np.ptp(lon), (lat - lat.mean()) / np.ptp(lat)
            edge = 0.42 + 0.06 * np.sin(8 * np.arctan2(dy, dx))
            agb = np.where(np.hypot(dx, dy) < edge, agb, 0.0)
        _write(agb_path, agb[None], crs="EPSG:4326", transform=transform, dtype="float32")
        entries.append(entry)
    return entries


def holes(rng: np.random.Generator, shape: tuple[int, ...], *, frac: float) -> np.ndarray:
    """Blobby masks (clouds, gaps) covering roughly ``frac`` of the pixels."""
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    mask = np.zeros(shape, bool)
    n = max(1, int(frac * shape[0] * shape[1] / 50))
    for cy, cx in zip(rng.integers(0, shape[0], n), rng.integers(0, shape[1], n), strict=True):
        mask |= (yy - cy) ** 2 + (xx - cx) ** 2 < 16
    return mask


def demo_config(data_dir: str = "data", out_dir: str = ".") -> dict:
    """The demo's configuration mapping for sites written by `make_demo_sites`.

    ``data_dir`` and ``out_dir`` are written as given: relative to the config file's folder.
    """
    sites = []
    for name in SITES:
        entry: dict = {
            "name": name,
            "satellite": f"{data_dir}/{name}_satellite.tif",
            "biomass": f"{data_dir}/{name}_biomass.tif",
        }
        if name == "gamma":
            entry["bands"] = list(DEMO_BANDS)
        sites.append(entry)
    return {
        "sites": sites,
        "cube": {
            "output": f"{out_dir}/cubes/demo.zarr",
            "grid": "biomass",
            "agb_range": [0, 600],
            "indices": "auto",
            "chunks": 128,
        },
        "chips": {"size": 16, "overlap": 0.0, "min_valid_fraction": 0.7, "max_nan_fraction": 0.3},
        "folds": {
            "n_folds": 3,
            "buffer_m": "auto",
            "validation_fraction": 0.15,
            "seed": 0,
            "output": f"{out_dir}/runs/folds.parquet",
        },
        # Small and short: the demo shows the whole pipeline in about a minute on a laptop. The
        # model is train's default (the benchmark's: dense head, batch norm, no lon/lat, target
        # in Mg/ha, refits with the buffer ring's far pixels), with two narrow conv blocks and
        # one refit per fold; the original pipeline's chip head fell 0.15-0.6 R² behind the
        # baseline here.
        "train": {
            "conv_channels": [16, 32],
            "ensemble": 1,
            "epochs": 25,
            "batch_size": 8,
            "patience": 8,
            "hnm_start_epoch": 10,
            "hgb_max_pixels": 20000,
            "output": f"{out_dir}/runs/demo",
        },
    }


def config_yaml(cfg: dict) -> str:
    """The demo config as YAML text, with a header saying where it comes from."""
    return (
        "# The demo: three synthetic sites written by `agbcube demo` (see agbcube/demo.py).\n"
        + yaml.safe_dump(cfg, sort_keys=False)
    )


def write_demo(directory: str | Path, *, size_px: int = 160, seed: int = 0) -> Path:
    """Generate the demo rasters under ``directory/data`` and its config ``directory/demo.yaml``.

    Returns the config's path.
    """
    directory = Path(directory)
    make_demo_sites(directory / "data", size_px=size_px, seed=seed)
    path = directory / "demo.yaml"
    path.write_text(config_yaml(demo_config()))
    return path
