"""STAC in and out.

* In: `agbcube.stac.composites` builds a site's seasonal multi-sensor composites from a STAC
  catalogue (a static one or an API), named as the ``multisensor-59`` layout names its bands.
* Out: `agbcube.stac.items` describes agbcube's outputs as STAC: cube Items, map Items and a
  run's map Collection.
* `agbcube.stac.demo` writes synthetic catalogues (``agbcube demo --stac``, tests, benchmarks).
"""

from __future__ import annotations

from agbcube.stac.composites import (
    PROVIDERS,
    SENSORS,
    Sensor,
    StacPlan,
    asset_table,
    clear_fraction_checks,
    composite,
    plan_composites,
    slope_deg,
    warn_no_clear,
)
from agbcube.stac.items import (
    cube_item,
    map_item,
    update_map_collection,
    write_cube_item,
    write_map_item,
)

__all__ = [
    "PROVIDERS",
    "SENSORS",
    "Sensor",
    "StacPlan",
    "asset_table",
    "clear_fraction_checks",
    "composite",
    "cube_item",
    "map_item",
    "plan_composites",
    "slope_deg",
    "update_map_collection",
    "warn_no_clear",
    "write_cube_item",
    "write_map_item",
]
