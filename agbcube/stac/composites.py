"""STAC in: seasonal multi-sensor composites from a STAC catalogue, on a site's target grid.

The original pipeline builds its 59-band stack in Earth Engine
(``../shared/reference/original-satellite_data_preparation.js``). This module builds the same
stack from a STAC catalogue: for each sensor and season it finds the items over the AGB map's
footprint (pystac for a static catalogue, pystac-client for a STAC API), loads them lazily onto
the target grid with odc-stac (Dask chunks the size of the cube's), masks clouds, shadows and
nodata per pixel, takes the per-pixel median of what is clear, and names the result as the
``multisensor-59`` layout does (``B2_T1`` … ``B12_T3``, ``SR_B2_T1`` …, ``VV_T1``, ``VH_T1`` …,
``PAL_HH``, ``PAL_HV``, ``dem``, ``slope``, ``CH``), so indices, folds and training need nothing
new.

* Sentinel-2 L2A: scene classes 0 (nodata), 3 (cloud shadow), 8, 9 (cloud, medium and high
  probability) and 10 (cirrus), and DN 0, are masked. Items of processing baseline 04.00 or later
  carry a +1000 offset (``BOA_ADD_OFFSET`` −1000), removed unless the item says it was already
  (``earthsearch:boa_offset_applied``), so values are on the pre-04.00 scale of the original's
  stack.
* Landsat-8 C2 L2: QA_PIXEL bits 0–4 (fill, dilated cloud, cirrus, cloud, cloud shadow) and DN 0
  are masked; DN kept (the indices scale them).
* Sentinel-1: the collection's values (linear γ0 on Planetary Computer; the original's are dB):
  set ``sentinel1_db`` to take 10·log10 per scene before the median.
* PALSAR-2 yearly mosaic: the year that overlaps the seasons most, DN as provided.
* DEM and canopy height: a mosaic of the items over the site; slope (degrees, Horn's method) is
  computed from the DEM on the target grid.
"""

from __future__ import annotations

import datetime as dt
import importlib
import json
import math
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlparse

import numpy as np
import xarray as xr
from odc.geo.geobox import GeoBox

from agbcube._io import digest
from agbcube.config import StacSource
from agbcube.errors import CatalogueUnreachableError, StacError, one_line

__all__ = [
    "PROVIDERS",
    "SENSORS",
    "Sensor",
    "StacPlan",
    "asset_table",
    "clear_fraction_checks",
    "composite",
    "plan_composites",
    "slope_deg",
    "warn_no_clear",
]

#: Sentinel-2 scene classes masked: nodata, cloud shadow, cloud medium/high probability, cirrus.
S2_MASKED_CLASSES = (0, 3, 8, 9, 10)
#: Landsat C2 QA_PIXEL bits masked: fill, dilated cloud, cirrus, cloud, cloud shadow.
LANDSAT_MASKED_BITS = (0, 1, 2, 3, 4)
_S2_OFFSET_DN = 1000.0


@dataclass(frozen=True)
class Sensor:
    """What a sensor contributes to the stack.

    ``bands`` are the layout's names before the season suffix; ``mask`` names the per-pixel
    quality asset; ``timing`` is ``season`` (a median per season), ``year`` (the yearly mosaic that
    overlaps the seasons most) or ``static`` (any date); ``resolution_m`` is its nominal pixel,
    which picks the resampling.
    """

    name: str
    bands: tuple[str, ...]
    mask: str | None
    timing: Literal["season", "year", "static"]
    resolution_m: float
    nodata: float | None


#: The sensors, in the order of the ``multisensor-59`` layout.
SENSORS: dict[str, Sensor] = {
    s.name: s
    for s in (
        Sensor(
            "sentinel-2",
            ("B2", "B3", "B4", "B5", "B6", "B7", "B8", "B8A", "B11", "B12"),
            "SCL",
            "season",
            20.0,
            0,
        ),
        Sensor(
            "landsat-8",
            ("SR_B2", "SR_B3", "SR_B4", "SR_B5", "SR_B6", "SR_B7"),
            "QA_PIXEL",
            "season",
            30.0,
            0,
        ),
        Sensor("sentinel-1", ("VV", "VH"), None, "season", 10.0, None),
        Sensor("palsar-2", ("PAL_HH", "PAL_HV"), None, "year", 25.0, 0),
        Sensor("dem", ("dem",), None, "static", 30.0, None),
        Sensor("canopy-height", ("CH",), None, "static", 10.0, None),
    )
}


@dataclass(frozen=True)
class Provider:
    """A catalogue's collection ids and asset keys (None: it has no such collection)."""

    collections: dict[str, str | None]
    assets: dict[str, dict[str, str]]


_S2_RAW = {
    "B2": "B02",
    "B3": "B03",
    "B4": "B04",
    "B5": "B05",
    "B6": "B06",
    "B7": "B07",
    "B8": "B08",
    "B8A": "B8A",
    "B11": "B11",
    "B12": "B12",
    "SCL": "SCL",
}
_S2_COMMON = {
    "B2": "blue",
    "B3": "green",
    "B4": "red",
    "B5": "rededge1",
    "B6": "rededge2",
    "B7": "rededge3",
    "B8": "nir",
    "B8A": "nir08",
    "B11": "swir16",
    "B12": "swir22",
    "SCL": "scl",
}
_LANDSAT_COMMON = {
    "SR_B2": "blue",
    "SR_B3": "green",
    "SR_B4": "red",
    "SR_B5": "nir08",
    "SR_B6": "swir16",
    "SR_B7": "swir22",
    "QA_PIXEL": "qa_pixel",
}
_LANDSAT_RAW = {name: name for name in _LANDSAT_COMMON}

#: Collection ids and asset keys per provider: the one place they are written down.
PROVIDERS: dict[str, Provider] = {
    "planetary-computer": Provider(
        collections={
            "sentinel-2": "sentinel-2-l2a",
            "landsat-8": "landsat-c2-l2",
            "sentinel-1": "sentinel-1-rtc",
            "palsar-2": "alos-palsar-mosaic",
            "dem": "cop-dem-glo-30",
            "canopy-height": None,
        },
        assets={
            "sentinel-2": _S2_RAW,
            "landsat-8": _LANDSAT_COMMON,
            "sentinel-1": {"VV": "vv", "VH": "vh"},
            "palsar-2": {"PAL_HH": "HH", "PAL_HV": "HV"},
            "dem": {"dem": "data"},
            "canopy-height": {"CH": "data"},
        },
    ),
    "earth-search": Provider(
        collections={
            "sentinel-2": "sentinel-2-l2a",
            "landsat-8": "landsat-c2-l2",
            "sentinel-1": "sentinel-1-grd",
            "palsar-2": None,
            "dem": "cop-dem-glo-30",
            "canopy-height": None,
        },
        assets={
            "sentinel-2": _S2_COMMON,
            "landsat-8": _LANDSAT_COMMON,
            "sentinel-1": {"VV": "vv", "VH": "vh"},
            "palsar-2": {"PAL_HH": "HH", "PAL_HV": "HV"},
            "dem": {"dem": "data"},
            "canopy-height": {"CH": "data"},
        },
    ),
    # The products' own names: Sentinel-2 SAFE bands, Landsat C2 file suffixes, GLO-30 'DEM'.
    "raw": Provider(
        collections={
            "sentinel-2": "sentinel-2-l2a",
            "landsat-8": "landsat-c2-l2",
            "sentinel-1": "sentinel-1-grd",
            "palsar-2": "alos-palsar-mosaic",
            "dem": "cop-dem-glo-30",
            "canopy-height": "canopy-height",
        },
        assets={
            "sentinel-2": _S2_RAW,
            "landsat-8": _LANDSAT_RAW,
            "sentinel-1": {"VV": "VV", "VH": "VH"},
            "palsar-2": {"PAL_HH": "HH", "PAL_HV": "HV"},
            "dem": {"dem": "DEM"},
            "canopy-height": {"CH": "CH"},
        },
    ),
}
_PROVIDER_HOSTS = {
    "planetarycomputer.microsoft.com": "planetary-computer",
    "earth-search.aws.element84.com": "earth-search",
}


def provider_of(source: StacSource) -> str:
    """The provider table a source uses: its ``provider``, or one recognised from the URL."""
    if source.provider != "auto":
        return source.provider
    host = urlparse(source.stac).hostname or ""
    return next((p for h, p in _PROVIDER_HOSTS.items() if host.endswith(h)), "raw")


def asset_table(source: StacSource) -> dict[str, tuple[str | None, dict[str, str]]]:
    """Per sensor: its collection id and ``{layout band or mask: asset key}``.

    The provider's table with the source's ``collections`` and ``assets`` laid over it.
    """
    table = PROVIDERS[provider_of(source)]
    return {
        name: (
            source.collections.get(name, table.collections[name]),
            {**table.assets[name], **source.assets.get(name, {})},
        )
        for name in SENSORS
    }


# --------------------------------------------------------------------------------------------
# catalogues


class _Catalogue:
    """Items of a static catalogue (walked once) or of a STAC API (searched)."""

    def __init__(self, href: str, *, site: str) -> None:
        from urllib3.exceptions import HTTPError  # pystac reads http(s) through urllib3

        self.href, self.site = href, site
        self._client: Any = None
        self._by_collection: dict[str, list[Any]] | None = None
        try:
            if href.endswith(".json") or not urlparse(href).scheme.startswith("http"):
                self._by_collection = _walk_static(href)
            else:
                self._open_api(href)
        except NotStacError as err:
            why = one_line(err, 300)
            raise StacError(
                f"site '{site}': {href} is not a STAC catalogue, collection, item or item "
                f"collection it can use ({why}); stac.catalog must name one (a URL: its API's "
                "root)"
            ) from err
        except (OSError, ValueError, KeyError, TypeError, HTTPError) as err:
            raise CatalogueUnreachableError(
                f"site '{site}': the STAC catalogue {href} cannot be opened ({err}); check the "
                "path or URL and the network"
            ) from err

    def _open_api(self, href: str) -> None:
        from pystac_client import Client
        from pystac_client.exceptions import APIError

        try:
            client = Client.open(href, timeout=60)
        except APIError as err:
            raise OSError(str(err)) from err
        if client.conforms_to("ITEM_SEARCH"):
            self._client = client
            self._collections = {c.id for c in client.get_collections()}
        else:  # a static catalogue served over HTTP
            self._by_collection = _group_items(client.get_items(recursive=True))

    def collections(self) -> set[str]:
        """Collection ids the catalogue has."""
        if self._by_collection is not None:
            return set(self._by_collection)
        return self._collections

    def search(
        self, collection: str, footprint: dict, span: tuple[dt.datetime, dt.datetime] | None
    ) -> list[Any]:
        """Items of ``collection`` over ``footprint`` (GeoJSON, EPSG:4326) within ``span``."""
        if self._by_collection is not None:
            from shapely.geometry import shape

            area = shape(footprint)
            return [
                item
                for item in self._by_collection.get(collection, [])
                if item.geometry
                and shape(item.geometry).intersects(area)
                and (span is None or _overlap_s(_interval(item), span) >= 0)
            ]
        from pystac_client.exceptions import APIError

        when = None if span is None else f"{span[0].isoformat()}/{span[1].isoformat()}"
        try:
            search = self._client.search(
                collections=[collection], intersects=footprint, datetime=when
            )
            return list(search.items())
        except (APIError, OSError) as err:
            raise CatalogueUnreachableError(
                f"site '{self.site}': searching collection '{collection}' of {self.href} failed "
                f"({err}); check the network and the URL"
            ) from err


def _walk_static(href: str) -> dict[str, list[Any]]:
    import pystac

    if "://" not in href and not Path(href).is_file():
        raise FileNotFoundError(f"no such file: {href}")
    try:
        try:
            root = pystac.read_file(href)
        except pystac.STACTypeError:
            return _group_items(pystac.ItemCollection.from_file(href))
        if isinstance(root, pystac.Item):
            return _group_items([root])
        return _group_items(root.get_items(recursive=True))  # type: ignore[attr-defined]
    except (pystac.STACError, pystac.STACTypeError, AttributeError, json.JSONDecodeError) as err:
        raise NotStacError(err) from err  # not JSON, or JSON that is not STAC
    except RecursionError as err:
        raise NotStacError("its child links form a cycle, or nest too deep to walk") from err


STATIC_MAX_ITEMS = 200_000  # items of a static catalogue, which is walked whole


class NotStacError(Exception):
    """JSON that is not a STAC catalogue, collection, item or item collection."""


def _group_items(items: Iterable[Any]) -> dict[str, list[Any]]:
    out: dict[str, list[Any]] = {}
    for n, item in enumerate(items):
        if n == STATIC_MAX_ITEMS:
            raise NotStacError(
                f"it holds more than {STATIC_MAX_ITEMS:,} items, more than a static catalogue "
                "walked whole can serve: search it through a STAC API instead"
            )
        if item.collection_id:  # an item without a collection cannot be told apart by sensor
            out.setdefault(item.collection_id, []).append(item)
    return out


def _interval(item: Any) -> tuple[dt.datetime, dt.datetime]:
    props = item.properties
    start = props.get("start_datetime") or props.get("datetime")
    end = props.get("end_datetime") or props.get("datetime")
    return _parse_time(start), _parse_time(end)


def _parse_time(text: str) -> dt.datetime:
    value = dt.datetime.fromisoformat(str(text).replace("Z", "+00:00"))
    return value if value.tzinfo else value.replace(tzinfo=dt.UTC)


def _overlap_s(a: tuple[dt.datetime, dt.datetime], b: tuple[dt.datetime, dt.datetime]) -> float:
    """Seconds two closed intervals share (negative: the gap between them)."""
    return (min(a[1], b[1]) - max(a[0], b[0])).total_seconds()


def _season_span(start: dt.date, end: dt.date) -> tuple[dt.datetime, dt.datetime]:
    """The whole days ``start`` … ``end`` in UTC."""
    first = dt.datetime.combine(start, dt.time(), tzinfo=dt.UTC)
    last = dt.datetime.combine(end, dt.time(23, 59, 59, 999999), tzinfo=dt.UTC)
    return first, last


# --------------------------------------------------------------------------------------------
# planning: every search and check, before any pixel is read


@dataclass(frozen=True)
class StacPlan:
    """The items each sensor and season composites, found and checked for one site.

    ``items[sensor][season]`` lists pystac Items; sensors that are not seasonal have one entry,
    ``"all"``. ``assets[sensor]`` maps layout band names (and the mask) to asset keys.
    """

    site: str
    source: StacSource
    provider: str
    collections: dict[str, str]
    assets: dict[str, dict[str, str]]
    items: dict[str, dict[str, list[Any]]]

    def band_names(self) -> list[str]:
        """The stack's band names, in the ``multisensor-59`` layout's order."""
        names: list[str] = []
        for sensor, seasons in self.items.items():
            spec = SENSORS[sensor]
            if spec.timing == "season":
                names += [f"{b}_{s}" for s in seasons for b in spec.bands]
            else:
                names += [*spec.bands, *(["slope"] if sensor == "dem" else [])]
        return names

    def facts(self) -> dict[str, Any]:
        """Provenance: the catalogue, the tables, the item ids, and a key of their content."""
        ids = {
            s: {t: [i.id for i in items] for t, items in by.items()} for s, by in self.items.items()
        }
        prints = [_fingerprint(item) for _, item in self.each_item()]
        return {
            "stac": self.source.stac,
            "provider": self.provider,
            "collections": self.collections,
            "assets": self.assets,
            "items": ids,
            "items_key": digest(prints),
        }

    def input_files(self) -> list[str]:
        """The assets the composites read (the layout's bands and masks of every item), files
        on this machine or URLs, whose content `agbcube.cube` checks when it decides a site
        is up to date."""
        return sorted(
            {
                _href(item.assets[key])
                for sensor, item in self.each_item()
                for key in set(self.assets[sensor].values()) & set(item.assets)
            }
        )

    def each_item(self) -> Iterator[tuple[str, Any]]:
        """``(sensor, item)`` for every item of every sensor and season."""
        for sensor, by in self.items.items():
            for items in by.values():
                for item in items:
                    yield sensor, item


def _href(asset: Any) -> str:
    return asset.get_absolute_href() or asset.href


def _fingerprint(item: Any) -> dict[str, Any]:
    """What an item's pixels depend on: its metadata, asset hrefs and, for local files, stats."""
    out: dict[str, Any] = {
        "id": item.id,
        "collection": item.collection_id,
        "properties": item.properties,
    }
    for key, asset in sorted(item.assets.items()):
        href = _href(asset)
        entry: dict[str, Any] = {"href": href}
        if "://" not in href and Path(href).is_file():
            st = Path(href).stat()
            entry.update(size=st.st_size, mtime_ns=st.st_mtime_ns)
        out[key] = entry
    return out


def plan_composites(source: StacSource, gbox: GeoBox, *, site: str) -> StacPlan:
    """Find and check the items of every sensor and season over ``gbox``; read no pixel.

    Parameters
    ----------
    source : StacSource
        The site's ``satellite:`` STAC settings.
    gbox : GeoBox
        The site's target grid; its footprint is searched.
    site : str
        Names the site in messages.

    Returns
    -------
    StacPlan

    Raises
    ------
    CatalogueUnreachableError
        The catalogue cannot be opened or searched.
    StacError
        A sensor has no collection or no item over the site, or items lack an asset.

    Warns
    -----
    UserWarning
        A season with no scene (its bands will be NaN), or items covering only part of the site.
    """
    catalogue = _Catalogue(source.stac, site=site)
    table = asset_table(source)
    sensors = _sensors(source, table, catalogue, site=site)
    footprint = gbox.extent.to_crs("EPSG:4326")
    spans = {name: _season_span(*days) for name, days in source.seasons.items()}
    whole = (min(s[0] for s in spans.values()), max(s[1] for s in spans.values()))
    items: dict[str, dict[str, list[Any]]] = {}
    for sensor in sensors:
        collection, assets = table[sensor]
        spec = SENSORS[sensor]
        found = catalogue.search(
            collection, footprint.json, None if spec.timing == "static" else whole
        )  # type: ignore[arg-type]
        found = [i for i in found if _keep(i, sensor, source)]
        if not found:
            raise StacError(
                f"site '{site}': the catalogue {source.stac} has no {sensor} item (collection "
                f"'{collection}') over the site{_when(spec, whole)}{_filters(sensor, source)}; "
                f"check the dates and the footprint, or leave {sensor} out of `sensors:`"
            )
        _check_assets(found, assets, sensor, site=site)
        _warn_coverage(found, footprint.geom, sensor, site=site)
        if spec.timing == "season":
            items[sensor] = {
                name: [i for i in found if _overlap_s(_interval(i), span) >= 0]
                for name, span in spans.items()
            }
            for name, chosen in items[sensor].items():
                if not chosen:
                    _warn_empty(site, sensor, name, source)
        else:
            items[sensor] = {"all": _best_year(found, whole) if spec.timing == "year" else found}
    return StacPlan(
        site=site,
        source=source,
        provider=provider_of(source),
        collections={s: table[s][0] for s in sensors},  # type: ignore[misc]
        assets={s: table[s][1] for s in sensors},
        items=items,
    )


def _sensors(
    source: StacSource,
    table: dict[str, tuple[str | None, dict[str, str]]],
    catalogue: _Catalogue,
    *,
    site: str,
) -> list[str]:
    """The sensors to composite, in layout order: those asked for, or those the catalogue has."""
    have = catalogue.collections()
    for sensor, collection in source.collections.items():  # named by the user: never dropped
        wanted = source.sensors is None or sensor in source.sensors
        if wanted and collection not in have:
            raise StacError(_no_collection(site, source, sensor, collection, have))
    if source.sensors is None:
        found = [s for s in SENSORS if table[s][0] in have]
        if not found:
            known = {s: table[s][0] for s in SENSORS}
            raise StacError(
                f"site '{site}': the catalogue {source.stac} has none of the collections "
                f"{known} (provider '{provider_of(source)}'; it has {sorted(have)[:20]}); set "
                "`provider:` or `collections:`"
            )
        return found
    for sensor in source.sensors:
        collection = table[sensor][0]
        if collection is None:
            raise StacError(
                f"site '{site}': provider '{provider_of(source)}' has no {sensor} collection; "
                f"name one with `collections: {{{sensor}: <id>}}` or leave {sensor} out of "
                "`sensors:`"
            )
        if collection not in have:
            raise StacError(_no_collection(site, source, sensor, collection, have))
    return [s for s in SENSORS if s in source.sensors]


def _no_collection(site: str, source: Any, sensor: str, collection: str, have: set[str]) -> str:
    import difflib

    close = difflib.get_close_matches(collection, sorted(have), n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return (
        f"site '{site}': the catalogue {source.stac} has no collection '{collection}' for "
        f"{sensor}{hint}; set `collections: {{{sensor}: <id>}}` or leave it out of `sensors:`"
    )


def _keep(item: Any, sensor: str, source: StacSource) -> bool:
    """Scene-level filters: cloud cover, Landsat-8 only, Sentinel-1 IW dual-pol in one pass."""
    props = item.properties
    if sensor in ("sentinel-2", "landsat-8"):
        cloud = props.get("eo:cloud_cover")
        if cloud is not None and float(cloud) > source.max_cloud_cover:
            return False
    if sensor == "landsat-8" and props.get("platform", "landsat-8").lower() != "landsat-8":
        return False
    if sensor == "sentinel-1":
        if source.orbit != "any" and props.get("sat:orbit_state", source.orbit) != source.orbit:
            return False
        if props.get("sar:instrument_mode", "IW") != "IW":
            return False
        if not {"VV", "VH"} <= set(props.get("sar:polarizations", ["VV", "VH"])):
            return False
    return True


def _when(spec: Sensor, whole: tuple[dt.datetime, dt.datetime]) -> str:
    if spec.timing == "static":
        return ""
    return f" between {whole[0].date()} and {whole[1].date()}"


def _filters(sensor: str, source: StacSource) -> str:
    if sensor in ("sentinel-2", "landsat-8"):
        return f" with at most {source.max_cloud_cover:g} % cloud"
    if sensor == "sentinel-1" and source.orbit != "any":
        return f" on {source.orbit} IW VV+VH passes"
    return ""


def _check_assets(items: list[Any], assets: dict[str, str], sensor: str, *, site: str) -> None:
    """Every item has every asset the table names, and local asset files exist."""
    for item in items:
        missing = sorted(k for k in assets.values() if k not in item.assets)
        if missing:
            raise StacError(
                f"site '{site}': {sensor} item '{item.id}' has no asset {missing} (it has "
                f"{sorted(item.assets)}); choose `provider:` or map the names with "
                f"`assets: {{{sensor}: {{<band>: <asset>}}}}`"
            )
        for key in assets.values():
            href = _href(item.assets[key])
            if "://" not in href and not Path(href).is_file():
                raise StacError(
                    f"site '{site}': {sensor} item '{item.id}' asset '{key}' points to {href}, "
                    "which does not exist; the catalogue has moved without its files?"
                )


def _warn_coverage(items: list[Any], footprint: Any, sensor: str, *, site: str) -> None:
    from shapely import union_all
    from shapely.geometry import shape

    covered = union_all([shape(i.geometry) for i in items]).intersection(footprint).area
    fraction = covered / footprint.area if footprint.area else 1.0
    if fraction < 0.999:
        warnings.warn(
            f"site '{site}': the {sensor} items cover {fraction:.1%} of the site; its bands are "
            "NaN elsewhere",
            UserWarning,
            stacklevel=3,
        )


def _warn_empty(site: str, sensor: str, season: str, source: StacSource) -> None:
    first, last = source.seasons[season]
    warnings.warn(
        f"site '{site}': {sensor} season {season} ({first} – {last}) has no scene over the site"
        f"{_filters(sensor, source)}; its bands are NaN",
        UserWarning,
        stacklevel=3,
    )


def _best_year(items: list[Any], whole: tuple[dt.datetime, dt.datetime]) -> list[Any]:
    """The items of the (yearly) period that overlaps the seasons most."""
    periods = {_interval(i) for i in items}
    best = max(periods, key=lambda p: (_overlap_s(p, whole), p[1]))
    return [i for i in items if _interval(i) == best]


# --------------------------------------------------------------------------------------------
# loading and compositing


def composite(plan: StacPlan, gbox: GeoBox, *, chunk_px: int = 256) -> xr.DataArray:
    """The site's stack as a lazy ``(band, y, x)`` float32 array on ``gbox``.

    Parameters
    ----------
    plan : StacPlan
        From `plan_composites` over the same grid.
    gbox : GeoBox
        The target grid.
    chunk_px : int
        Spatial chunk side of the loads (the cube's chunks).

    Returns
    -------
    xr.DataArray
        Bands named as `StacPlan.band_names`; NaN where no clear observation exists. No
        spatial coordinates: the caller puts it on ``gbox``.
    """
    from rasterio.errors import NotGeoreferencedWarning

    patch_url = _signer(plan.source.sign, site=plan.site)
    # odc-loader warps in-memory windows through rasterio, which warns that they have no
    # geotransform (they are given one explicitly); the warnings come from Dask's worker threads,
    # where a catch_warnings() here would not reach, and would otherwise flood the CLI.
    warnings.filterwarnings(
        "ignore", message="Dataset has no geotransform", category=NotGeoreferencedWarning
    )
    if _remote(plan):
        import odc.stac

        odc.stac.configure_rio(cloud_defaults=True)
    layers: list[xr.DataArray] = []
    for sensor, seasons in plan.items.items():
        spec = SENSORS[sensor]
        for items in seasons.values():
            bands = _sensor_layers(plan, spec, items, gbox, chunk_px, patch_url)
            layers += [bands[b] for b in spec.bands]
            if sensor == "dem":
                layers.append(slope_deg(bands["dem"], gbox))
    names = plan.band_names()
    stack = xr.concat(
        [layer.drop_vars(["x", "y", "spatial_ref", "time"], errors="ignore") for layer in layers],
        dim="band",
        coords="minimal",
        compat="override",
    )
    return stack.assign_coords(band=names).astype(np.float32)


def _remote(plan: StacPlan) -> bool:
    return any(
        "://" in _href(a)
        for by in plan.items.values()
        for items in by.values()
        for i in items[:1]
        for a in i.assets.values()
    )


def _signer(sign: str | None, *, site: str) -> Callable[[str], str] | None:
    """The href signing hook: ``planetary_computer.sign`` or a user's ``module:function``."""
    if sign is None:
        return None
    module, _, name = (
        "planetary_computer:sign" if sign == "planetary-computer" else sign
    ).partition(":")
    try:
        func = getattr(importlib.import_module(module), name, None)
    except ImportError as err:
        hint = " (pip install planetary-computer)" if module == "planetary_computer" else ""
        raise StacError(f"site '{site}': sign: {sign!r} needs module '{module}'{hint}") from err
    if not callable(func):
        raise StacError(f"site '{site}': sign: {sign!r}: '{module}' has no function '{name}'")
    return func


def _resampling(spec: Sensor, gbox: GeoBox) -> tuple[str, str]:
    """(data, mask) resampling: average/mode when coarsening by more than 1.5× in area."""
    pixel_m2 = gbox.extent.to_crs("EPSG:6933").area / (gbox.shape.y * gbox.shape.x)
    if pixel_m2 > 1.5 * spec.resolution_m**2:
        return "average", "mode"
    return "bilinear", "nearest"


def _sensor_layers(
    plan: StacPlan,
    spec: Sensor,
    items: list[Any],
    gbox: GeoBox,
    chunk_px: int,
    patch_url: Callable[[str], str] | None,
) -> dict[str, xr.DataArray]:
    """One season (or the one layer) of a sensor: ``{layout band: (y, x) lazy float32}``."""
    if not items:
        return {b: _nan_layer(gbox, chunk_px) for b in spec.bands}
    assets = plan.assets[spec.name]
    data_rs, mask_rs = _resampling(spec, gbox)
    mask = assets[spec.mask] if spec.mask else None
    keys = [assets[b] for b in spec.bands] + ([mask] if mask else [])
    import odc.stac

    ds = odc.stac.load(
        items,
        bands=keys,
        geobox=gbox,
        chunks={"time": 1, "y": chunk_px, "x": chunk_px},
        groupby=_by_index if spec.timing == "season" else _one_group,
        resampling={k: (mask_rs if k == mask else data_rs) for k in keys},
        # float32: a 2x2 average of DN keeps its fraction; classes and QA bits (< 2**24) stay exact.
        dtype="float32",
        patch_url=patch_url,
        fail_on_error=True,
        **({} if spec.nodata is None else {"nodata": spec.nodata}),
    )
    ds = ds.rename({k: v for k, v in {"latitude": "y", "longitude": "x"}.items() if k in ds.dims})
    clear = _clear(spec, ds, assets)
    out = {}
    for band in spec.bands:
        raw = ds[assets[band]]
        value = _values(spec, raw, items, plan.source).where(clear & _valid(raw, spec))
        out[band] = _median(value)
    return out


def _by_index(_item: Any, _parsed: Any, index: int) -> int:
    # One time slice per item, in the plan's order, so per-item offsets line up with slices.
    return index


def _one_group(_item: Any, _parsed: Any, _index: int) -> int:
    # A mosaic: every item into one plane (first valid pixel wins, in time then id order).
    return 0


def _valid(raw: xr.DataArray, spec: Sensor) -> xr.DataArray:
    """Not the band's nodata (the fill odc-stac also writes where no item has pixels)."""
    fill = raw.attrs.get("nodata", spec.nodata)
    if fill is None or (isinstance(fill, float) and math.isnan(fill)):
        return raw.notnull()
    return raw != fill


def _clear(spec: Sensor, ds: xr.Dataset, assets: dict[str, str]) -> xr.DataArray | bool:
    """Per-pixel clear-sky mask from the sensor's quality asset (True where usable)."""
    if spec.mask == "SCL":
        return ~ds[assets["SCL"]].isin(S2_MASKED_CLASSES)
    if spec.mask == "QA_PIXEL":
        bits = sum(1 << b for b in LANDSAT_MASKED_BITS)
        return (ds[assets["QA_PIXEL"]].astype(np.uint16) & bits) == 0
    return True


def _values(spec: Sensor, raw: xr.DataArray, items: list[Any], source: StacSource) -> xr.DataArray:
    """Pixel values on the original's scale: S2 offset removed, S1 in dB if asked."""
    value = raw.astype(np.float32)
    if spec.name == "sentinel-2":
        offsets = xr.DataArray(np.array([s2_offset(i) for i in items], np.float32), dims="time")
        value = value - offsets
    elif spec.name == "sentinel-1" and source.sentinel1_db:
        value = 10 * np.log10(value.where(value > 0))
    return value


def s2_offset(item: Any) -> float:
    """DN to subtract from a Sentinel-2 L2A item to put it on the pre-04.00 scale (0 or 1000)."""
    props = item.properties
    if props.get("earthsearch:boa_offset_applied") or props.get("sentinel:boa_offset_applied"):
        return 0.0
    baseline = next(
        (
            props[k]
            for k in (
                "s2:processing_baseline",
                "sentinel:processing_baseline",
                "processing:version",
            )
            if props.get(k) is not None
        ),
        None,
    )
    try:
        return _S2_OFFSET_DN if baseline is not None and float(baseline) >= 4.0 else 0.0
    except ValueError:
        return 0.0


def _nan_layer(gbox: GeoBox, chunk_px: int) -> xr.DataArray:
    import dask.array as da

    data = da.full(gbox.shape.yx, np.nan, dtype=np.float32, chunks=chunk_px)
    return xr.DataArray(data, dims=("y", "x"))


def _median(value: xr.DataArray) -> xr.DataArray:
    """Per-pixel median over time of the non-NaN values; NaN where there is none."""
    return xr.apply_ufunc(
        _nanmedian_last,
        value.chunk({"time": -1}),
        input_core_dims=[["time"]],
        dask="parallelized",
        output_dtypes=[np.float32],
    )


def _nanmedian_last(a: np.ndarray) -> np.ndarray:
    """``np.nanmedian`` over the last axis, without its all-NaN warning (those stay NaN)."""
    a = np.sort(a, axis=-1)  # NaN sorts last
    n = np.count_nonzero(~np.isnan(a), axis=-1)
    lo = np.take_along_axis(a, np.maximum(n - 1, 0)[..., None] // 2, axis=-1)[..., 0]
    hi = np.take_along_axis(a, (n // 2)[..., None].clip(max=max(a.shape[-1] - 1, 0)), axis=-1)[
        ..., 0
    ]
    out = ((lo.astype(np.float64) + hi) / 2).astype(np.float32)
    out[n == 0] = np.nan
    return out


def slope_deg(dem: xr.DataArray, gbox: GeoBox) -> xr.DataArray:
    """Terrain slope in degrees (Horn's method) of a ``(y, x)`` DEM in metres on ``gbox``.

    Pixel sizes are in metres: the CRS's linear unit, or on a geographic grid the local
    east–west and north–south length of a degree at each row's latitude. The DEM is extended by
    one pixel by linear extrapolation, so edge pixels get a full stencil (exact on a plane).
    """
    a = gbox.affine
    if gbox.crs.geographic:
        lat = np.radians(a.f + a.e * (np.arange(gbox.shape.y) + 0.5))
        dx = abs(a.a) * (111_412.84 * np.cos(lat) - 93.5 * np.cos(3 * lat))
        dy = abs(a.e) * (111_132.92 - 559.82 * np.cos(2 * lat))
    else:
        unit = gbox.crs.proj.axis_info[0].unit_conversion_factor
        dx = np.full(gbox.shape.y, abs(a.a) * unit)
        dy = np.full(gbox.shape.y, abs(a.e) * unit)
    z = _extrapolate_1px(dem.data.astype(np.float32))
    ny, nx = dem.shape

    def at(i: int, j: int) -> Any:  # the neighbour (i, j) rows/cols away, for every pixel
        return z[1 + i : 1 + i + ny, 1 + j : 1 + j + nx]

    east = (at(-1, 1) + 2 * at(0, 1) + at(1, 1)) - (at(-1, -1) + 2 * at(0, -1) + at(1, -1))
    south = (at(1, -1) + 2 * at(1, 0) + at(1, 1)) - (at(-1, -1) + 2 * at(-1, 0) + at(-1, 1))
    gx = xr.DataArray(east.rechunk(dem.data.chunks), dims=("y", "x")) / 8
    gy = xr.DataArray(south.rechunk(dem.data.chunks), dims=("y", "x")) / 8
    dx_m = xr.DataArray(dx.astype(np.float32), dims="y")
    dy_m = xr.DataArray(dy.astype(np.float32), dims="y")
    return np.degrees(np.arctan(np.hypot(gx / dx_m, gy / dy_m))).astype(np.float32)


def _extrapolate_1px(z: Any) -> Any:
    """A 2-D dask array grown by one pixel on each side, continuing the edge gradient."""
    import dask.array as da

    if min(z.shape) < 2:
        return da.pad(z, 1, mode="edge")
    z = da.concatenate([2 * z[:1] - z[1:2], z, 2 * z[-1:] - z[-2:-1]], axis=0)
    return da.concatenate([2 * z[:, :1] - z[:, 1:2], z, 2 * z[:, -1:] - z[:, -2:-1]], axis=1)


# --------------------------------------------------------------------------------------------
# after the write: seasons that had scenes but no clear pixel


def clear_fraction_checks(ds: xr.Dataset) -> dict[str, xr.DataArray]:
    """Lazy share of pixels with a value, per STAC sensor and season (empty for file sites)."""
    import json

    bands = json.loads(ds.attrs.get("stac_layers", "{}"))
    return {label: ds["features"].sel(band=band).notnull().mean() for label, band in bands.items()}


def warn_no_clear(site: str, fractions: dict[str, float]) -> None:
    """Warn for every sensor and season whose composite is NaN everywhere."""
    for label, fraction in fractions.items():
        if not fraction:
            warnings.warn(
                f"site '{site}': {label} has no clear observation at any pixel (every scene "
                "masked as cloud, shadow or nodata); its bands are NaN",
                UserWarning,
                stacklevel=2,
            )


def layer_labels(plan: StacPlan) -> dict[str, str]:
    """``"<sensor> season <name>"`` → one of its band names, for `clear_fraction_checks`."""
    out = {}
    for sensor, seasons in plan.items.items():
        spec = SENSORS[sensor]
        for season in seasons:
            if spec.timing == "season":
                out[f"{sensor} season {season}"] = f"{spec.bands[0]}_{season}"
            else:
                out[sensor] = spec.bands[0]
    return out
