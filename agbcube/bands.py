"""Band names: presets and resolution of a stack's names from the file or the config."""

from __future__ import annotations

from collections.abc import Sequence

from agbcube.errors import BandError

__all__ = ["BAND_PRESETS", "resolve_band_names"]

_SEASONS = ("T1", "T2", "T3")
_S2 = ("B2", "B3", "B4", "B5", "B6", "B7", "B8", "B8A", "B11", "B12")
_L8 = ("SR_B2", "SR_B3", "SR_B4", "SR_B5", "SR_B6", "SR_B7")

BAND_PRESETS: dict[str, tuple[str, ...]] = {
    # The Earth Engine export of the original pipeline (../shared/benchmark/README.md).
    "multisensor-59": (
        *(f"{b}_{t}" for t in _SEASONS for b in _S2),
        *(f"{b}_{t}" for t in _SEASONS for b in _L8),
        *(f"{p}_{t}" for t in _SEASONS for p in ("VV", "VH")),
        "PAL_HH",
        "PAL_HV",
        "dem",
        "slope",
        "CH",
    ),
}
"""Named band lists a site's ``bands: <name>`` selects instead of the names themselves, in
file order: ``multisensor-59`` is the original pipeline's Earth Engine export (Sentinel-2 and
Landsat 8 per season T1-T3, Sentinel-1 VV/VH per season, PALSAR-2 HH/HV, DEM, slope, canopy
height)."""


def resolve_band_names(
    n_bands: int,
    descriptions: Sequence[str | None],
    configured: Sequence[str] | str | None,
    *,
    source: str,
) -> list[str]:
    """Name the bands of a stack.

    Parameters
    ----------
    n_bands : int
        Number of bands in the file.
    descriptions : sequence of str or None
        The file's band descriptions (GeoTIFF band descriptions), one per band.
    configured : list of str, str or None
        The ``bands:`` setting: explicit names, a preset name, or None to use the descriptions.
    source : str
        Names the file and site in error messages.

    Returns
    -------
    list of str

    Raises
    ------
    BandError
        Unknown preset, count mismatch, missing descriptions, or duplicate names.
    """
    if isinstance(configured, str):
        if configured not in BAND_PRESETS:
            raise BandError(
                f"{source}: unknown band preset {configured!r}; known presets: "
                f"{sorted(BAND_PRESETS)}, or give the names as a list"
            )
        names = list(BAND_PRESETS[configured])
        origin = f"preset {configured!r}"
    elif configured is not None:
        names = [str(n) for n in configured]
        origin = "`bands:` in the config"
    else:
        if not any(descriptions):
            raise BandError(
                f"{source}: the file's {n_bands} bands have no descriptions; name them with "
                "`bands:` (a list of names or a preset such as 'multisensor-59')"
            )
        blank = [i + 1 for i, d in enumerate(descriptions) if not d]
        if blank:
            raise BandError(
                f"{source}: bands {blank} have no description; name all bands with `bands:`"
            )
        names = [str(d) for d in descriptions]
        origin = "the file's band descriptions"
    if len(names) != n_bands:
        raise BandError(
            f"{source}: the file has {n_bands} bands but {origin} gives {len(names)} names; "
            "give exactly one name per band, in file order"
        )
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise BandError(f"{source}: band names repeat in {origin}: {dupes}")
    return names
