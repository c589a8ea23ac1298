"""Spectral and radar indices, found and computed by band name.

Bands are recognised by name, with an optional season suffix (``B8_T1``, ``SR_B5_T2``, ``VH_T3``):

=========  ======================================  ==========================================
sensor     band names                              scaling applied before index math
=========  ======================================  ==========================================
``S2``     ``B2 B3 B4 B8 B11 B12`` (+ others)      reflectance = DN × 1e-4
``L8``     ``SR_B2 … SR_B7``                       reflectance = DN × 2.75e-5 − 0.2
``S1``     ``VV VH``                               already dB; linear = 10^(dB/10)
``PAL``    ``PAL_HH PAL_HV``                       γ⁰ dB = 10·log10(DN²) − 83
=========  ======================================  ==========================================

Each index is named ``<sensor>_<family>[_<season>]``, e.g. ``S2_NDVI_T1``, ``L8_NBR_T2``,
``S1_RVI_T1``, ``PAL_HVHH``. All computations are lazy xarray arithmetic.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import xarray as xr

from agbcube.errors import BandError

__all__ = ["INDEX_FAMILIES", "IndexSpec", "compute_indices", "plan_indices"]

# sensor -> (regex on a band name capturing base and season, role -> base band)
_SENSORS: dict[str, tuple[re.Pattern[str], dict[str, str]]] = {
    "S2": (
        re.compile(r"^(B(?:1[0-2]|[1-9]|8A))(?:_(\w+))?$", re.IGNORECASE),
        {"blue": "B2", "green": "B3", "red": "B4", "nir": "B8", "swir1": "B11", "swir2": "B12"},
    ),
    "L8": (
        re.compile(r"^(SR_B[1-7])(?:_(\w+))?$", re.IGNORECASE),
        {
            "blue": "SR_B2",
            "green": "SR_B3",
            "red": "SR_B4",
            "nir": "SR_B5",
            "swir1": "SR_B6",
            "swir2": "SR_B7",
        },
    ),
    "S1": (re.compile(r"^(VV|VH)(?:_(\w+))?$", re.IGNORECASE), {"vv": "VV", "vh": "VH"}),
    "PAL": (
        re.compile(r"^(PAL_HH|PAL_HV)(?:_(\w+))?$", re.IGNORECASE),
        {"hh": "PAL_HH", "hv": "PAL_HV"},
    ),
}


def _ratio(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(a - b) / (a + b), NaN where the denominator vanishes."""
    return _safe_div(a - b, a + b)


def _safe_div(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    out = np.full(np.broadcast_shapes(np.shape(num), np.shape(den)), np.nan, dtype=np.float32)
    return np.divide(num, den, out=out, where=np.abs(den) > 1e-9)  # no 0/0 warnings


def _s2_scale(a: np.ndarray) -> np.ndarray:
    return a * np.float32(1e-4)


def _l8_scale(a: np.ndarray) -> np.ndarray:
    return a * np.float32(2.75e-5) - np.float32(0.2)


def _palsar_db(dn: np.ndarray) -> np.ndarray:
    # γ⁰ dB = 10·log10(DN²) − 83 (JAXA PALSAR-2 mosaic calibration); DN 0 marks no data.
    positive = dn > 0
    db = np.float32(20.0) * np.log10(np.where(positive, dn, np.float32(1.0))) - np.float32(83.0)
    return np.where(positive, db, np.float32(np.nan))


def _db_to_linear(db: np.ndarray) -> np.ndarray:
    return np.float32(10.0) ** (db / np.float32(10.0))


_OPTICAL: dict[str, tuple[tuple[str, ...], Callable[..., np.ndarray]]] = {
    "NDVI": (("nir", "red"), lambda nir, red: _ratio(nir, red)),
    "EVI": (
        ("nir", "red", "blue"),
        lambda nir, red, blue: _safe_div(2.5 * (nir - red), nir + 6.0 * red - 7.5 * blue + 1.0),
    ),
    "SAVI": (("nir", "red"), lambda nir, red: 1.5 * _safe_div(nir - red, nir + red + 0.5)),
    "GNDVI": (("nir", "green"), lambda nir, green: _ratio(nir, green)),
    "NDWI": (("green", "nir"), lambda green, nir: _ratio(green, nir)),  # McFeeters (1996)
    "NBR": (("nir", "swir2"), lambda nir, swir2: _ratio(nir, swir2)),
    "NDMI": (("nir", "swir1"), lambda nir, swir1: _ratio(nir, swir1)),
}

#: sensor -> family -> (roles, function of the scaled role bands)
INDEX_FAMILIES: dict[str, dict[str, tuple[tuple[str, ...], Callable[..., np.ndarray]]]] = {
    "S2": _OPTICAL,
    "L8": _OPTICAL,
    "S1": {
        "VHVV": (("vh", "vv"), lambda vh, vv: vh - vv),  # ratio as a dB difference
        "RVI": (
            ("vv", "vh"),
            lambda vv, vh: _safe_div(
                4.0 * _db_to_linear(vh), _db_to_linear(vv) + _db_to_linear(vh)
            ),
        ),
    },
    "PAL": {"HVHH": (("hv", "hh"), lambda hv, hh: hv - hh)},  # dB difference
}

_SCALE: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "S2": _s2_scale,
    "L8": _l8_scale,
    "S1": lambda da: da,
    "PAL": _palsar_db,
}


@dataclass(frozen=True)
class IndexSpec:
    """One index to compute: its output name, family, sensor and the band per role."""

    name: str
    sensor: str
    family: str
    bands: dict[str, str]


def _groups(band_names: Sequence[str]) -> dict[tuple[str, str | None], dict[str, str]]:
    """Group band names by (sensor, season): base band -> actual band name."""
    groups: dict[tuple[str, str | None], dict[str, str]] = {}
    for name in band_names:
        for sensor, (pattern, _) in _SENSORS.items():
            m = pattern.match(name)
            if m:
                base, season = m.group(1).upper(), m.group(2)
                groups.setdefault((sensor, season), {})[base] = name
                break
    return groups


def _candidates(band_names: Sequence[str]) -> list[tuple[IndexSpec, list[str]]]:
    """Every (sensor, season, family) the names hint at, with the base bands it lacks."""
    out = []
    for (sensor, season), present in _groups(band_names).items():
        roles = _SENSORS[sensor][1]
        for family, (needed, _) in INDEX_FAMILIES[sensor].items():
            bands = {r: present[roles[r]] for r in needed if roles[r] in present}
            missing = [
                roles[r] + (f"_{season}" if season else "") for r in needed if r not in bands
            ]
            name = f"{sensor}_{family}" + (f"_{season}" if season else "")
            out.append((IndexSpec(name, sensor, family, bands), missing))
    return out


def plan_indices(
    band_names: Sequence[str], request: str | Sequence[str] = "auto", *, source: str = "stack"
) -> list[IndexSpec]:
    """Decide which indices to compute from the available band names.

    Parameters
    ----------
    band_names : sequence of str
        The stack's band names.
    request : "auto", "none" or list of str
        ``"auto"``: every index whose bands exist. A list holds families (``"NDVI"``, computed
        for every sensor and season that has its bands) or full names (``"S2_NDVI_T1"``).
    source : str
        Names the site in error messages.

    Returns
    -------
    list of IndexSpec

    Raises
    ------
    BandError
        A requested index cannot be computed; the message names the missing band(s) and lists
        the available bands.
    """
    if request == "none":
        return []
    candidates = _candidates(band_names)
    if request == "auto":
        return [spec for spec, missing in candidates if not missing]
    families = {f for fams in INDEX_FAMILIES.values() for f in fams}
    chosen: dict[str, IndexSpec] = {}
    for item in request:
        if item.upper() in families:
            ok = [s for s, missing in candidates if s.family == item.upper() and not missing]
            if not ok:
                lacking = sorted(
                    {b for s, missing in candidates if s.family == item.upper() for b in missing}
                )
                hint = f" (missing e.g. {lacking[:4]})" if lacking else ""
                raise BandError(
                    f"{source}: index {item!r} was requested but no sensor/season has its "
                    f"bands{hint}; available bands: {list(band_names)}"
                )
            chosen.update({s.name: s for s in ok})
            continue
        match = [(s, missing) for s, missing in candidates if s.name.upper() == item.upper()]
        if not match:
            raise BandError(
                f"{source}: unknown index {item!r}; use a family ({sorted(families)}) or a name "
                "like 'S2_NDVI_T1' whose bands exist; available bands: "
                f"{list(band_names)}"
            )
        spec, missing = match[0]
        if missing:
            raise BandError(
                f"{source}: index {item!r} needs band(s) {missing}, which the stack lacks; "
                f"available bands: {list(band_names)}"
            )
        chosen[spec.name] = spec
    return list(chosen.values())


def index_kernel(
    stack: np.ndarray, band_names: Sequence[str], specs: Sequence[IndexSpec], *, keep: bool
) -> np.ndarray:
    """Indices of a band-last numpy stack ``(..., band)`` → ``(..., [bands +] indices)``.

    One call computes every index of a chunk: one dask task per chunk instead of a few per
    index, which is what keeps big cubes' graphs small.
    """
    position = {name: i for i, name in enumerate(band_names)}
    layers = [stack.astype(np.float32, copy=False)] if keep else []
    with np.errstate(invalid="ignore", over="ignore"):
        for spec in specs:
            roles, func = INDEX_FAMILIES[spec.sensor][spec.family]
            scale = _SCALE[spec.sensor]
            args = [scale(stack[..., position[spec.bands[r]]]) for r in roles]
            layers.append(np.asarray(func(*args), dtype=np.float32)[..., None])
    return np.concatenate(layers, axis=-1)


def compute_indices(
    features: xr.DataArray, specs: Sequence[IndexSpec], *, keep_bands: bool = False
) -> xr.DataArray | None:
    """Compute indices lazily from a ``(band, y, x)`` stack with a ``band`` coordinate of names.

    Returns a float32 ``(band, y, x)`` DataArray whose ``band`` holds the index names (after
    the input bands when ``keep_bands``), or None when there is nothing to return. Dask-backed
    inputs stay lazy: one task per spatial chunk.
    """
    if not specs and not keep_bands:
        return None
    names = [str(b) for b in features["band"].values]
    out_names = (names if keep_bands else []) + [s.name for s in specs]
    if features.chunks is not None:
        features = features.chunk({"band": -1})
    result = xr.apply_ufunc(
        index_kernel,
        features,
        input_core_dims=[["band"]],
        output_core_dims=[["index"]],
        kwargs={"band_names": names, "specs": list(specs), "keep": keep_bands},
        dask="parallelized",
        output_dtypes=[np.float32],
        dask_gufunc_kwargs={"output_sizes": {"index": len(out_names)}},
    )
    result = result.rename(index="band").assign_coords(band=out_names)
    return result.transpose("band", ...)
