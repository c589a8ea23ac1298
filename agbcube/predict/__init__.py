"""Wall-to-wall AGB maps: blended sliding windows, ensemble uncertainty, area of applicability.

Prediction runs tile by tile through Dask. Windows lie on one global grid (stride
``stride_px``, the last row and column of windows flush with the edge), and every pixel's value
is the weighted mean of all windows covering it, with a 2-D cosine taper as weight: a tile
computes exactly the windows of the global grid that touch it, as a single pass over the whole
site would, so tile borders never show, and the taper hides window borders.

Each tile's task reads its own input window (the tile plus the windows reaching into it) from
the cube, so memory is bounded by the tile size and flat in the site's size; tiles are written
into the output store as they finish, so an interrupted write resumes where it stopped
(`write_maps`). A run's ensemble travels as the path of its file: each process (a Dask
worker on a cluster) loads it once, on its own device, and keeps it for the tiles it computes.

* Dense head: each window's per-pixel map is blended directly.
* Chip head: each window's single value is spread over its pixels with the same taper, which
  gives a smooth map at roughly the chip's resolution (a chip model knows nothing finer).

The ensemble is the fold models of a run: the map is their mean AGB (Mg/ha), the uncertainty
their standard deviation.

Area of applicability [Meyer_Pebesma2021]_: the dissimilarity index (DI) of a pixel is the
distance, in standardised feature space, to the nearest training pixel, divided by the mean
distance between training pixels; the threshold is the upper whisker of the training pixels' own
DIs, computed against the other folds' pixels only (cross-validated): the largest training DI
not above Q75 + 1.5 IQR, as in the CAST package; the AOA is ``DI <= threshold``. Features are
equally weighted (the CNN gives no importance).

.. [Meyer_Pebesma2021] Meyer, H. & Pebesma, E. (2021). Predicting into unknown space? Estimating
   the area of applicability of spatial prediction models. Methods in Ecology and Evolution 12,
   1620–1633.

Modules: `~agbcube.predict.stage` (a run and a site → maps), `~agbcube.predict.tiles` (the Dask
graph of tiles), `~agbcube.predict.windows` (the window grid and blending),
`~agbcube.predict.models` (the ensemble each process loads once), `~agbcube.predict.aoa` (the
area of applicability), `~agbcube.predict.writers` (Zarr, COGs, quick looks),
`~agbcube.predict.assemble` (chips back into a map), `~agbcube.predict.layers` (what each layer is).
"""

from __future__ import annotations

from agbcube.predict.aoa import AOAReference, aoa_reference
from agbcube.predict.assemble import chips_to_dataarray
from agbcube.predict.layers import LAYER_INFO, LAYERS
from agbcube.predict.stage import predict_run, run_cube
from agbcube.predict.tiles import predict_site
from agbcube.predict.windows import cosine_weights
from agbcube.predict.writers import quicklook, write_maps

__all__ = [
    "LAYERS",
    "LAYER_INFO",
    "AOAReference",
    "aoa_reference",
    "chips_to_dataarray",
    "cosine_weights",
    "predict_run",
    "predict_site",
    "quicklook",
    "run_cube",
    "write_maps",
]
