"""CF conventions of agbcube's Zarr stores (cubes and maps), so other tools read them right.

A plain ``xr.open_zarr(store, group=site)`` gives ``spatial_ref`` as a coordinate (each
georeferenced variable lists it in its ``coordinates`` as well as its ``grid_mapping``), so
rioxarray's ``.rio.crs`` and odc-geo's ``.odc.geobox`` find the CRS without
``decode_coords="all"``. ``x``/``y`` carry ``standard_name``, ``axis`` and ``units``, and the
root says which conventions it follows.
"""

from __future__ import annotations

import xarray as xr

#: AGB's unit, spelt the same in every store, GeoTIFF and STAC Item (UDUNITS, as CF asks).
AGB_UNITS = "Mg ha-1"
CONVENTIONS = "CF-1.8"
GRID_MAPPING = "spatial_ref"

_AXES = {
    # (geographic, projected) attrs of each horizontal coordinate
    "x": ({"standard_name": "longitude", "units": "degrees_east"}, "projection_x_coordinate"),
    "y": ({"standard_name": "latitude", "units": "degrees_north"}, "projection_y_coordinate"),
}


def cf_dataset(ds: xr.Dataset, *, geographic: bool, linear_units: str = "m") -> xr.Dataset:
    """``ds`` with the CF attributes and encodings above (a copy; data untouched).

    Parameters
    ----------
    ds : xr.Dataset
        A site's cube or maps, with ``spatial_ref`` written (rioxarray).
    geographic : bool
        Whether the CRS is geographic (x/y in degrees) or projected.
    linear_units : str
        A projected CRS's axis unit, as UDUNITS spells it.
    """
    ds = ds.copy()
    ds.attrs["Conventions"] = CONVENTIONS
    for axis, (geo, projected) in _AXES.items():
        if axis not in ds.coords:
            continue
        attrs = dict(geo) if geographic else {"standard_name": projected, "units": linear_units}
        ds[axis].attrs.update(axis=axis.upper(), **attrs)
    if GRID_MAPPING in ds.variables:
        ds = ds.set_coords(GRID_MAPPING)
        for var in ds.data_vars.values():
            if {"y", "x"} <= set(var.dims):
                # an attribute, not rioxarray's encoding: a write with its own encodings
                # (maps, tile by tile) would drop it, and GDAL needs it to find the CRS
                var.encoding.pop("grid_mapping", None)
                var.attrs["grid_mapping"] = GRID_MAPPING
                # xarray leaves a grid-mapping variable out of `coordinates` (CF does not call
                # it one), and then reads it back as a data variable; name it there as well
                var.encoding["coordinates"] = GRID_MAPPING
    return ds


def linear_units(crs: object) -> str:
    """A projected CRS's axis unit as UDUNITS spells it (``m`` for metres); any CRS object
    with ``to_wkt()`` (odc-geo, rasterio, pyproj)."""
    from pyproj import CRS

    crs = CRS.from_user_input(crs.to_wkt())
    if crs.is_geographic:
        return "degrees"
    unit = crs.axis_info[0].unit_name if crs.axis_info else "metre"
    return {"metre": "m", "meter": "m", "foot": "ft", "US survey foot": "US_survey_foot"}.get(
        unit, unit
    )
