"""The YAML configuration: one file, one section per stage.

Sections are frozen pydantic models with ``extra="forbid"``, so a misspelt key fails when the file
is loaded, with a "did you mean" hint and the key's full path. Relative paths resolve against the
folder of the configuration file. The original pipeline's layout (``raster_pairs`` with
``satellite_path``, ``biomass_path``, ``site_name``) is translated on load, with a warning for each
setting that has no equivalent.
"""

from __future__ import annotations

import collections
import datetime as dt
import difflib
import os
import re
import warnings
from collections.abc import Hashable
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from agbcube.errors import ConfigError, one_line

__all__ = [
    "ChipsConfig",
    "Config",
    "CubeConfig",
    "FoldsConfig",
    "GridSpec",
    "SiteConfig",
    "StacSource",
    "TrainConfig",
    "config_reference",
    "load_config",
    "load_run_config",
    "read_yaml",
    "with_overrides",
]

_S = TypeVar("_S", bound="_Section")

_SITE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _resolve(value: Path | None, info: ValidationInfo) -> Path | None:
    """Resolve a relative path against the config file's folder (passed as validation context)."""
    if value is None:
        return None
    value = Path(value).expanduser()
    base = (info.context or {}).get("base_dir")
    if base is not None and not value.is_absolute():
        value = Path(base) / value
    return Path(os.path.normpath(value))


#: Sensors a STAC source can composite, in the order of the ``multisensor-59`` layout.
StacSensor = Literal["sentinel-2", "landsat-8", "sentinel-1", "palsar-2", "dem", "canopy-height"]
_SEASON_NAME = re.compile(r"^[A-Za-z0-9]+$")
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


class StacSource(_Section):
    """A site's satellite bands composited from a STAC catalogue (agbcube.stac.composites)."""

    stac: str = Field(
        description="Static STAC catalogue/collection (path or URL of its JSON) or a STAC API URL."
    )
    seasons: dict[str, tuple[dt.date, dt.date]] = Field(
        min_length=1,
        description="Season name -> [first day, last day] (both included); bands are named "
        "<band>_<season>, e.g. B4_T1.",
    )
    sensors: list[StacSensor] | None = Field(
        default=None,
        description="Sensors to composite (sentinel-2, landsat-8, sentinel-1, palsar-2, dem, "
        "canopy-height); null: every one whose collection the catalogue has.",
    )
    max_cloud_cover: float = Field(
        default=30.0,
        ge=0,
        le=100,
        description="Largest scene cloud cover (%), Sentinel-2 and Landsat.",
    )
    provider: Literal["auto", "planetary-computer", "earth-search", "raw"] = Field(
        default="auto",
        description="Table of collection ids and asset names (agbcube.stac.PROVIDERS); 'auto' "
        "picks it from the catalogue URL, else 'raw' (B02 … SCL, SR_B2 … QA_PIXEL).",
    )
    collections: dict[StacSensor, str] = Field(
        default_factory=dict, description="Collection id per sensor, over the provider's."
    )
    assets: dict[StacSensor, dict[str, str]] = Field(
        default_factory=dict,
        description="Asset key per band name per sensor (e.g. {canopy-height: {CH: data}}), over "
        "the provider's.",
    )
    orbit: Literal["descending", "ascending", "any"] = Field(
        default="descending", description="Sentinel-1 pass direction (the original: descending)."
    )
    sentinel1_db: bool = Field(
        default=False,
        description="Turn Sentinel-1 linear backscatter into dB (10·log10) per scene before the "
        "median, as the original's GEE collection holds it; false keeps the collection's values.",
    )
    sign: str | None = Field(
        default=None,
        description="Href signing: 'planetary-computer' (needs the planetary-computer package) or "
        "'module:function' taking and returning an href; null: none.",
    )

    @field_validator("stac", mode="after")
    @classmethod
    def _resolve_stac(cls, value: str, info: ValidationInfo) -> str:
        return value if _URL.match(value) else str(_resolve(Path(value), info))

    @field_validator("seasons", mode="after")
    @classmethod
    def _check_seasons(
        cls, value: dict[str, tuple[dt.date, dt.date]]
    ) -> dict[str, tuple[dt.date, dt.date]]:
        for name, (start, end) in value.items():
            if not _SEASON_NAME.match(name):
                raise ValueError(
                    f"season name {name!r} must hold only letters and digits (it becomes a band "
                    "name suffix, e.g. B4_T1)"
                )
            if end < start:
                raise ValueError(f"season {name!r} ends ({end}) before it starts ({start})")
        return value

    @field_validator("sign", mode="after")
    @classmethod
    def _check_sign(cls, value: str | None) -> str | None:
        if value not in (None, "planetary-computer") and ":" not in value:
            raise ValueError(
                f"sign must be 'planetary-computer' or 'module:function', got {value!r}"
            )
        return value


_DEVICE = re.compile(r"^(auto|cpu|(cuda|gpu)(:\d+)?)$")
DEVICES = "auto, cpu, cuda or cuda:N (gpu is read as cuda)"


def check_device(spec: str, where: str = "device") -> str:
    """``spec`` as torch names it (``gpu``/``gpu:N`` read as ``cuda``/``cuda:N``).

    Raises
    ------
    ConfigError
        Naming ``where`` and the accepted values, for anything else.
    """
    try:
        return _device(spec)
    except ValueError as err:
        raise ConfigError(f"{where}: {err}") from None


def _device(spec: str) -> str:
    text = str(spec).strip().lower()
    if not _DEVICE.match(text):
        raise ValueError(f"{spec!r} is not a device; use {DEVICES}")
    return re.sub(r"^gpu", "cuda", text)


def _satellite_kind(value: Any) -> str:
    # A mapping is a STAC source, anything else a file path: errors then come from one branch.
    return "StacSource" if isinstance(value, dict | StacSource) else "GeoTIFF"


def _check_crs(value: str) -> str:
    """A CRS pyproj understands (EPSG code, WKT, PROJ string), else a ValueError naming it."""
    from pyproj import CRS
    from pyproj.exceptions import CRSError

    try:
        CRS.from_user_input(value)
    except CRSError as err:
        raise ValueError(
            f"{value!r} is not a CRS pyproj knows ({err}); give e.g. 'EPSG:32643', a WKT or a "
            "PROJ string"
        ) from None
    return value


class SiteConfig(_Section):
    """One site: a multi-band satellite stack (or a STAC source) and a single-band AGB map."""

    name: str = Field(description="Site name; becomes the Zarr group name.")
    satellite: Annotated[
        Annotated[Path, Tag("GeoTIFF")] | Annotated[StacSource, Tag("StacSource")],
        Discriminator(_satellite_kind),
    ] = Field(
        description="Multi-band satellite GeoTIFF (any CRS, grid and dtype), or a STAC source "
        "({stac, seasons, ...}: see sites[].satellite (STAC))."
    )
    biomass: Path = Field(description="Single-band AGB GeoTIFF in Mg/ha.")
    bands: list[str] | str | None = Field(
        default=None,
        description="Band names: a list, a preset name (e.g. 'multisensor-59'), or null to use "
        "the file's band descriptions.",
    )
    satellite_nodata: float | None = Field(
        default=None, description="Override of the satellite file's nodata value (e.g. -9999)."
    )
    biomass_nodata: float | None = Field(
        default=None, description="Override of the AGB file's nodata value."
    )
    crs: str | None = Field(
        default=None,
        description="CRS to assume for rasters of this site that carry none (e.g. 'EPSG:4326').",
    )

    @field_validator("crs")
    @classmethod
    def _check_site_crs(cls, value: str | None) -> str | None:
        return None if value is None else _check_crs(value)

    @field_validator("name")
    @classmethod
    def _check_name(cls, value: str) -> str:
        if not _SITE_NAME.match(value):
            raise ValueError(
                f"site name {value!r} must start with a letter or digit and hold only letters, "
                "digits, '_', '-' or '.' (it becomes a Zarr group and a file name)"
            )
        return value

    @field_validator("satellite", "biomass", mode="after")
    @classmethod
    def _resolve_paths(cls, value: Path | StacSource, info: ValidationInfo) -> Path | StacSource:
        return value if isinstance(value, StacSource) else _resolve(value, info)

    @model_validator(mode="after")
    def _stac_names_its_bands(self) -> SiteConfig:
        if isinstance(self.satellite, StacSource):
            given = [k for k in ("bands", "satellite_nodata") if getattr(self, k) is not None]
            if given:
                raise ValueError(
                    f"site {self.name!r}: a STAC source names its bands (B2_T1, ..., CH) and "
                    f"masks its nodata itself; remove {given}"
                )
        return self


class GridSpec(_Section):
    """An explicit target grid: a CRS and a square pixel size in the CRS's units."""

    crs: str = Field(description="Target CRS, e.g. 'EPSG:32643'.")
    resolution: float = Field(gt=0, description="Pixel size in the target CRS's units.")

    @field_validator("crs")
    @classmethod
    def _check_grid_crs(cls, value: str) -> str:
        return _check_crs(value)


class CubeConfig(_Section):
    """How the sites become a Zarr cube."""

    output: Path = Field(
        default=Path("cubes/cube.zarr"), validate_default=True, description="Zarr store to write."
    )
    grid: Literal["biomass", "satellite"] | GridSpec = Field(
        default="biomass",
        description="Target grid: each site's AGB grid ('biomass'), its satellite grid, or "
        "{crs, resolution}.",
    )
    agb_range: tuple[float, float] = Field(
        default=(0.0, 600.0),
        description="Valid AGB (Mg/ha): values <= low (so 0 is missing), > high, or non-finite "
        "become NaN.",
    )
    indices: Literal["auto", "none"] | list[str] = Field(
        default="auto",
        description="'auto': every index whose bands exist; 'none'; or a list of index families "
        "('NDVI') or full names ('S2_NDVI_T1').",
    )
    chunks: int = Field(default=256, ge=16, description="Spatial chunk size (pixels) of the cube.")

    @field_validator("output", mode="after")
    @classmethod
    def _resolve_output(cls, value: Path, info: ValidationInfo) -> Path:
        return _resolve(value, info)

    @field_validator("agb_range")
    @classmethod
    def _check_range(cls, value: tuple[float, float]) -> tuple[float, float]:
        if not value[0] < value[1]:
            raise ValueError(f"agb_range must be [low, high] with low < high, got {list(value)}")
        return value


class ChipsConfig(_Section):
    """How each site's cube is cut into square chips."""

    size: int = Field(default=24, ge=2, description="Chip side in pixels.")
    overlap: float = Field(
        default=0.1, ge=0.0, lt=1.0, description="Fraction of a chip shared with its neighbour."
    )
    min_valid_fraction: float = Field(
        default=0.7, ge=0.0, le=1.0, description="Least fraction of valid AGB pixels in a chip."
    )
    max_nan_fraction: float = Field(
        default=0.3, ge=0.0, le=1.0, description="Largest fraction of NaN feature values in a chip."
    )


class FoldsConfig(_Section):
    """Hybrid site-spatial K-fold cross-validation."""

    n_folds: int = Field(default=5, ge=2, description="Number of test folds.")
    buffer_m: Literal["auto"] | Annotated[float, Field(ge=0)] = Field(
        default="auto",
        description="Gap (metres) between test footprints and train/val footprints; 'auto' uses "
        "each site's AGB autocorrelation range from a fitted variogram.",
    )
    min_buffer_m: float = Field(
        default=0.0, ge=0, description="Floor applied to the buffer ('auto' or not), metres."
    )
    min_train_fraction: float = Field(
        default=0.1,
        gt=0,
        lt=1,
        description="With buffer_m 'auto': the buffer shrinks below the variogram range (never "
        "below min_buffer_m, with a warning) until every fold keeps this share of a site's "
        "non-test chips for training.",
    )
    validation_fraction: float = Field(
        default=0.15,
        ge=0.0,
        lt=0.5,
        description="Share of each fold's training pool held out "
        "as spatially separate validation clusters.",
    )
    clusters_per_fold: int = Field(
        default=4, ge=1, description="Spatial clusters per fold and site (KMeans on chip centres)."
    )
    seed: int = Field(default=0, description="Random seed; equal seeds give equal folds.")
    output: Path = Field(
        default=Path("runs/folds.parquet"),
        validate_default=True,
        description="GeoParquet of chips and fold roles.",
    )

    @field_validator("output", mode="after")
    @classmethod
    def _resolve_output(cls, value: Path, info: ValidationInfo) -> Path:
        return _resolve(value, info)


def _group(name: str) -> dict[str, Any]:
    """Field metadata: the group a setting is listed under in the config reference."""
    return {"json_schema_extra": {"group": name}}


_MODEL, _OPTIM, _AUGMENT, _EVAL, _DATA = (
    _group(g) for g in ("model", "optimisation", "augmentation", "evaluation", "data path")
)


def conv_reach(model: str, head: str, conv_channels: list[int]) -> int:
    """The convolutions' reach: the dense head's unpadded convolutions take one pixel of
    context per block on each side; a chip head pads (no reach), ``hgb-pixel`` has none."""
    return len(conv_channels) if model == "cnn-coordinate" and head == "dense" else 0


class TrainConfig(_Section):
    """Model training under the folds.

    The defaults are the most accurate model measured under honest folds (BENCHMARKS.md,
    "Accuracy under honest CV"); ``configs/original.yaml`` holds the original pipeline's
    protocol, kept for comparison.
    """

    # -- model ------------------------------------------------------------------------------
    model: Literal["cnn-coordinate", "hgb-pixel"] = Field(
        default="cnn-coordinate",
        description="'cnn-coordinate' (the CNN) or 'hgb-pixel' (HistGradientBoosting on pixels).",
        **_MODEL,
    )
    head: Literal["chip", "dense"] = Field(
        default="dense",
        description="'dense': an AGB map per chip, the loss over every labelled pixel; 'chip': "
        "one AGB value per chip (its mean), as the original pipeline (too few targets to learn "
        "from under honest folds).",
        **_MODEL,
    )
    conv_channels: list[int] = Field(
        default=[32, 64, 128],
        min_length=1,
        description="Output channels of the conv blocks.",
        **_MODEL,
    )
    bottleneck: int = Field(
        default=0,
        ge=0,
        description="Channels of a 1×1 convolution that mixes the input bands per pixel before "
        "the conv blocks (0: none): the first 3×3 block then convolves these instead of every "
        "band, far fewer multiply-adds with 100+ bands.",
        **_MODEL,
    )
    separable: bool = Field(
        default=False,
        description="Depthwise-separable conv blocks: each 3×3 convolution becomes a 3×3 "
        "convolution of each channel on its own followed by a 1×1 convolution mixing them (the "
        "same reach, several times fewer multiply-adds; on the benchmark sites less accurate, "
        "BENCHMARKS.md, issue 21).",
        **_MODEL,
    )
    fc_units: list[int] = Field(
        default=[128, 64], description="Fully connected layers (chip head).", **_MODEL
    )
    norm: Literal["instance", "batch", "none"] = Field(
        default="batch",
        description="Normalisation after each convolution ('batch' keeps each chip's absolute "
        "level, which 'instance' removes).",
        **_MODEL,
    )
    dropout: float = Field(default=0.2, ge=0, lt=1, description="Dropout probability.", **_MODEL)
    coordinates: Literal["none", "geographic"] = Field(
        default="none",
        description="Extra input channels with each pixel's lon/lat (standardised), or none "
        "(across a buffer they can only help a model recognise where it trained).",
        **_MODEL,
    )
    bands: list[str] | None = Field(
        default=None, description="Feature bands to use (default: all bands of the cube).", **_MODEL
    )
    context_px: Literal["auto"] | Annotated[int, Field(ge=0, le=64)] = Field(
        default="auto",
        description="Dense head: feature pixels read around every chip on each side, so its edge "
        "pixels see their real neighbours (as in a map) rather than padding; inputs only, their "
        "AGB is never a label. 'auto': the conv stack's reach (one pixel per block; 0 for the "
        "chip head).",
        **_MODEL,
    )
    log_target: bool = Field(
        default=False,
        description="Train on log(AGB). Its back-transform predicts the median, which runs low "
        "where AGB is high and skewed; false trains in Mg/ha, like the metrics.",
        **_MODEL,
    )
    # -- optimisation -----------------------------------------------------------------------
    loss: Literal["mse", "huber", "spatial"] = Field(default="huber", description="Loss.", **_OPTIM)
    huber_delta: float = Field(
        default=1.0, gt=0, description="Huber delta (target units).", **_OPTIM
    )
    spatial_loss_weight: float = Field(
        default=0.2, ge=0, description="Weight of the residual-autocorrelation penalty.", **_OPTIM
    )
    batch_size: int = Field(default=16, ge=1, description="Chips per batch.", **_OPTIM)
    epochs: int = Field(default=100, ge=1, description="Maximum epochs per fold.", **_OPTIM)
    learning_rate: float = Field(default=1e-3, gt=0, description="AdamW learning rate.", **_OPTIM)
    weight_decay: float = Field(default=5e-3, ge=0, description="AdamW weight decay.", **_OPTIM)
    patience: int = Field(
        default=20, ge=1, description="Early-stopping patience (epochs).", **_OPTIM
    )
    val_window: int = Field(
        default=5,
        ge=1,
        description="Epochs in the trailing mean of the validation loss that early stopping and "
        "the best epoch follow (1: each epoch's own loss, as the original pipeline).",
        **_OPTIM,
    )
    refit: bool = Field(
        default=True,
        description="After early stopping, train fresh models for the best number of epochs on "
        "every chip beyond the test buffer (the validation chips and their buffer ring too) and "
        "predict the test chips with them.",
        **_OPTIM,
    )
    ensemble: int = Field(
        default=3,
        ge=1,
        description="Models per fold from different seeds, their predictions averaged (with "
        "refit: one early-stopped run picks the epochs, then this many refits).",
        **_OPTIM,
    )
    early_stopped_member: bool = Field(
        default=False,
        description="With refit: the early-stopped model that picks the epochs is also one of "
        "the ensemble's members, so `ensemble: 3` trains it and 2 refits (one refit fewer; on "
        "the benchmark: three quarters of a CV's time, R² 0.01-0.02 lower at two sites; "
        "BENCHMARKS.md, 'The early-stopping fit as a member').",
        **_OPTIM,
    )
    members: Literal["refit", "branch"] = Field(
        default="refit",
        description="With refit: how the members after the first are trained. 'refit': each a "
        "fresh model for the selected number of epochs (the ensemble costs `ensemble` refits); "
        "'branch': each continues from member 0's weights with its own seed (sampling, "
        "augmentation, dropout) for `branch_fraction` of those epochs, the learning rate "
        "restarted and annealed again (on the benchmark: two thirds of a CV's time, Khaoyai's "
        "chip R² 0.03 lower; BENCHMARKS.md, 'Ensemble members without extra fits').",
        **_OPTIM,
    )
    branch_fraction: float = Field(
        default=0.25,
        gt=0,
        le=1,
        description="members: branch: a branch's epochs as a fraction of the selected number "
        "of epochs (at least one).",
        **_OPTIM,
    )
    label_buffer: Literal["chip", "pixel"] = Field(
        default="pixel",
        description="'pixel': also train on the pixels of buffer-ring chips whose centres lie "
        "beyond the buffer (their nearer pixels masked; features stay inputs, as when "
        "predicting); 'chip': only the chips the folds' roles allow, whole.",
        **_OPTIM,
    )
    hard_negative_mining: bool = Field(default=True, description="Oversample hard chips.", **_OPTIM)
    hnm_start_epoch: int = Field(default=20, ge=0, description="First epoch of mining.", **_OPTIM)
    oversampling_factor: float = Field(
        default=2.0,
        ge=1,
        description="Weight of the hardest chip relative to an easy one.",
        **_OPTIM,
    )
    seed: int = Field(
        default=0, description="Seed of initialisation, sampling, augmentation.", **_OPTIM
    )
    max_bad_steps: int = Field(
        default=20,
        ge=1,
        description="Consecutive non-finite losses before training stops.",
        **_OPTIM,
    )
    amp: bool = Field(default=True, description="Mixed precision (bfloat16) on GPU.", **_OPTIM)
    # -- augmentation -----------------------------------------------------------------------
    augment: bool = Field(default=True, description="Random flips and 90° rotations.", **_AUGMENT)
    spectral_augment: bool = Field(
        default=True, description="Per-band multiplicative jitter.", **_AUGMENT
    )
    spectral_jitter: float = Field(
        default=0.05, ge=0, description="Jitter s.d. (std units).", **_AUGMENT
    )
    aug_probability: float = Field(
        default=0.7, ge=0, le=1, description="Augmentation chance.", **_AUGMENT
    )
    # -- evaluation -------------------------------------------------------------------------
    baseline: Literal["hgb-pixel", "none"] = Field(
        default="hgb-pixel",
        description="Also fit this baseline on the same folds, reported side by side.",
        **_EVAL,
    )
    tta: bool = Field(default=True, description="Test-time augmentation.", **_EVAL)
    tta_rotations: int = Field(
        default=4, ge=1, le=8, description="Dihedral transforms averaged.", **_EVAL
    )
    interval_level: float = Field(
        default=0.9,
        gt=0,
        lt=1,
        description="Coverage of the prediction intervals calibrated on the test folds "
        "(metrics.json 'intervals'; the maps' agb_lower and agb_upper).",
        **_EVAL,
    )
    hgb_max_pixels: int = Field(
        default=60000,
        ge=100,
        description="Training pixels sampled for the hgb-pixel model.",
        **_EVAL,
    )
    random_cv: bool = Field(
        default=False,
        description="Also score the hgb-pixel model under a random K-fold of the same chips (no "
        "buffer: test chips' neighbours train, as in many published figures), reported as "
        "random_cv in metrics.json beside the honest folds' figures, to show the gap.",
        **_EVAL,
    )
    # -- data path --------------------------------------------------------------------------
    data_path: Literal["auto", "device", "chunks", "stream"] = Field(
        default="auto",
        description="'device': load the fold's chips once into device memory; 'chunks': read "
        "the cube chunk by chunk in storage order, each chunk once per pass, chips shuffled "
        "within a buffer (cubes larger than memory); 'stream': read chip by chip through "
        "xbatcher (slow; the reference the others are tested against); 'auto': device when the "
        "chips fit, else chunks.",
        **_DATA,
    )
    shuffle_chips: int = Field(
        default=2048,
        ge=1,
        description="Shuffle buffer of the streamed paths (chips held, prepared).",
        **_DATA,
    )
    device: str = Field(
        default="auto",
        description="'auto', 'cpu', 'cuda' or 'cuda:N' ('gpu' is read as 'cuda').",
        **_DATA,
    )
    compile: Literal["auto"] | bool = Field(
        default="auto",
        description="torch.compile the model's training steps (inductor; on the CPU it "
        "generates C++ and needs a C++ compiler). The compile (10-25 s) is paid about once per "
        "process; compiled steps round differently from eager ones, as another thread count "
        "does. 'auto': on the CPU where a C++ compiler is found, for fits of at least "
        "10 000 chip-steps (training chips × epochs); not on a GPU, where it is unmeasured.",
        **_DATA,
    )
    output: Path = Field(
        default=Path("runs/train"), validate_default=True, description="Run directory.", **_DATA
    )

    @field_validator("output", mode="after")
    @classmethod
    def _resolve_output(cls, value: Path, info: ValidationInfo) -> Path:
        return _resolve(value, info)

    @field_validator("device", mode="after")
    @classmethod
    def _check_device(cls, value: str) -> str:
        return _device(value)

    @model_validator(mode="before")
    @classmethod
    def _retired(cls, data: Any) -> Any:
        if isinstance(data, dict) and "num_workers" in data:
            warnings.warn(
                "train.num_workers is no longer used (the streamed data paths read ahead in "
                "one thread) and is ignored: remove it from the config",
                FutureWarning,
                stacklevel=2,
            )
            data = {k: v for k, v in data.items() if k != "num_workers"}
        return data

    @model_validator(mode="before")
    @classmethod
    def _auto_context(cls, data: Any) -> Any:
        # 'auto' is resolved on load, so a run's saved settings hold the number it used
        if isinstance(data, dict) and data.get("context_px", "auto") == "auto":
            blocks = data.get("conv_channels", [32, 64, 128])
            reach = conv_reach(
                data.get("model", "cnn-coordinate"),
                data.get("head", "dense"),
                blocks if isinstance(blocks, list) else [],
            )
            data = {**data, "context_px": reach}
        return data

    @property
    def reach_px(self) -> int:
        """Pixels the model's convolutions consume on each side of a chip (`conv_reach`)."""
        return conv_reach(self.model, self.head, self.conv_channels)

    @model_validator(mode="after")
    def _context_needs_dense(self) -> TrainConfig:
        if self.context_px and self.model == "cnn-coordinate" and self.head != "dense":
            raise ValueError(
                f"context_px: {self.context_px} needs head: dense (a chip head maps a fixed-size "
                "chip to one value); set context_px: 0 or head: dense"
            )
        return self


class Config(_Section):
    """A whole agbcube configuration."""

    sites: list[SiteConfig] = Field(min_length=1, description="The sites to build.")
    cube: CubeConfig = Field(default_factory=CubeConfig)
    chips: ChipsConfig = Field(default_factory=ChipsConfig)
    folds: FoldsConfig = Field(default_factory=FoldsConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    source: Path | None = Field(default=None, exclude=True, description="The file it came from.")

    @model_validator(mode="before")
    @classmethod
    def _fill_sections(cls, data: Any) -> Any:
        # Validate omitted sections too, so their default paths resolve against the config.
        if isinstance(data, dict):
            data = {"cube": {}, "chips": {}, "folds": {}, "train": {}, **data}
        return data

    @model_validator(mode="after")
    def _unique_sites(self) -> Config:
        names = [site.name for site in self.sites]
        dupes = sorted(n for n, k in collections.Counter(names).items() if k > 1)
        if dupes:
            raise ValueError(f"site names must be unique; repeated: {dupes}")
        return self


# --------------------------------------------------------------------------------------------
# loading


def load_config(path: str | Path) -> Config:
    """Read and validate a YAML configuration file.

    Parameters
    ----------
    path : str or Path
        The YAML file. Relative paths inside it resolve against its folder.

    Returns
    -------
    Config

    Raises
    ------
    ConfigError
        The file is missing, is not YAML, or a key is unknown or has the wrong type.
    """
    path = Path(path)
    raw = read_yaml(path, what="config file")
    return parse_config(raw, base_dir=path.resolve().parent, source=path)


def load_run_config(run_dir: str | Path) -> Config:
    """The configuration a training run was made with (its ``config.yaml``), validated as
    strictly as a fresh one: an edited or foreign run config is a `ConfigError`.
    """
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise ConfigError(
            f"{path} not found: is {run_dir} a run directory written by `agbcube train`?"
        )
    raw = read_yaml(path, what="run config")
    return parse_config(raw, base_dir=path.resolve().parent, source=f"run config {path}")


class _UniqueKeyLoader(getattr(yaml, "CSafeLoader", yaml.SafeLoader)):  # type: ignore[misc]
    """YAML's safe loader, except that a key given twice in one mapping is an error (YAML
    keeps the last one silently: a second ``train:`` section would drop the first)."""

    def construct_mapping(self, node: Any, deep: bool = False) -> dict:
        seen: set = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if not isinstance(key, Hashable):
                continue  # the safe loader's own mapping construction refuses it
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"the key {key!r} is given twice", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def read_yaml(path: str | Path, *, what: str = "YAML file") -> Any:
    """Parse a YAML file, turning every way it can be unreadable into a `ConfigError`."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{what} {path} is a folder; give the path of a YAML file")
    if not path.is_file():
        raise ConfigError(f"{what} {path} does not exist (check the path)")
    try:
        if (size := path.stat().st_size) > YAML_MAX_BYTES:
            raise ConfigError(
                f"{what} {path} is {size / 2**20:.0f} MiB; settings fit in far less (at most "
                f"{YAML_MAX_BYTES // 2**20} MiB): is it the right file?"
            )
        data = path.read_bytes()
        text = data.decode("utf-8-sig")  # UTF-8, with or without a byte-order mark
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        raise ConfigError(
            f"{what} {path} is not UTF-8 text (byte 0x{data[err.start]:02x} on line {line}); "
            "save it as UTF-8"
        ) from None
    except OSError as err:
        raise ConfigError(f"cannot read {what} {path}: {err.strerror or err}") from err
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)  # a SafeLoader (libyaml's when built)
    except (yaml.YAMLError, ValueError, RecursionError) as err:  # ValueError: a bad date
        detail = one_line(err)
        raise ConfigError(f"{what} {path} is not valid YAML: {detail}") from None
    if data is None:
        raise ConfigError(f"{what} {path} is empty; see configs/benchmark.yaml for an example")
    if (n := _expanded_size(data, {})) > YAML_MAX_VALUES:
        raise ConfigError(
            f"{what} {path} holds {n:,} values once its aliases (*name) are expanded, more than "
            f"the {YAML_MAX_VALUES:,} settings could need; write the values out, or remove the "
            "aliases that repeat others"
        )
    return data


YAML_MAX_BYTES = 16 * 2**20  # a config or a run's file of settings
YAML_MAX_VALUES = 1_000_000  # values once YAML aliases are expanded


def _expanded_size(node: Any, seen: dict[int, int]) -> int:
    """How many values ``node`` holds with every alias expanded: counted once per distinct
    object (aliases share theirs), so a document built to expand exponentially is measured
    in the time it took to parse."""
    if not isinstance(node, dict | list):
        return 1
    if id(node) not in seen:
        seen[id(node)] = 0  # a recursive alias counts once
        children = [*node.keys(), *node.values()] if isinstance(node, dict) else node
        seen[id(node)] = 1 + sum(_expanded_size(c, seen) for c in children)
    return seen[id(node)]


def parse_config(
    raw: Any, *, base_dir: str | Path | None = None, source: str | Path | None = None
) -> Config:
    """Validate an already-parsed configuration mapping (see `load_config`)."""
    where = str(source) if source is not None else "config"
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping of sections, got {type(raw).__name__}")
    legacy = _is_legacy(raw)
    if legacy:
        raw = _translate_legacy(raw, where)
    raw = dict(raw)
    if source is not None:
        raw["source"] = str(Path(source).resolve())
    try:
        return Config.model_validate(raw, context={"base_dir": base_dir})
    except ValidationError as err:
        note = (
            " (an original-pipeline config: keys are named as agbcube names them, e.g. "
            "raster_pairs[i] is sites.i, training.num_epochs is train.epochs)"
            if legacy
            else ""
        )
        raise ConfigError(_format_errors(err, where) + note) from None


def with_overrides(section: _S, where: str, **changes: Any) -> _S:
    """A copy of a config section with ``changes`` (those not ``None``), validated as strictly
    as a fresh config: a command-line override such as ``--epochs 0`` is an error naming the
    key, as it would be in the YAML.

    Raises
    ------
    ConfigError
    """
    given = {k: v for k, v in changes.items() if v is not None}
    if not given:
        return section
    data = {**section.model_dump(), **given}
    try:
        return type(section).model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_errors(err, f"{where} (with {given})")) from None


def _format_errors(err: ValidationError, where: str) -> str:
    """The invalid settings on one line, numbered; a single one after ``where``.

    Of a union's errors, the one deepest in the key's path is kept: ``cube.grid: {crs: …}``
    failing inside the mapping is not also reported as "not 'biomass' or 'satellite'".
    """
    errors = [(".".join(str(p) for p in e["loc"] if not _is_union_tag(p)), e) for e in err.errors()]
    locs = [loc for loc, _ in errors]
    errors = [(loc, e) for loc, e in errors if not any(o.startswith(loc + ".") for o in locs)]
    problems = []
    for loc, e in errors:
        if e["type"] == "extra_forbidden":
            key = str(e["loc"][-1])
            problems.append(f"{loc}: unknown key '{key}'.{_did_you_mean(key, e['loc'][:-1])}")
        elif e["type"] == "missing":
            problems.append(f"{loc}: required key is missing")
        else:
            msg = e["msg"].removeprefix("Value error, ")
            problems.append(f"{loc}: {one_line(msg)} (got {_short(e.get('input'))})")
    if len(problems) == 1:
        return f"{where}: {problems[0]}"
    shown = problems[:_SHOWN]
    listed = "; ".join(f"({i}) {p.rstrip('.')}" for i, p in enumerate(shown, start=1))
    more = f"; and {len(problems) - len(shown)} more" if len(problems) > len(shown) else ""
    return f"{where}: {len(problems)} invalid settings: {listed}{more}"


_SHOWN = 6  # invalid settings named in one message


def _is_union_tag(part: Any) -> bool:
    # pydantic puts the union member tried into the location (e.g. 'literal[...]', 'float').
    return isinstance(part, str) and (
        part.startswith(("literal[", "function-", "tuple[", "list["))
        or part in {"float", "int", "str", "GridSpec", "GeoTIFF", "StacSource", "constrained-float"}
    )


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _did_you_mean(key: str, parent_loc: tuple) -> str:
    model: type[BaseModel] | None = Config
    for part in parent_loc:
        if isinstance(part, int) or _is_union_tag(part) or model is None:
            continue
        field = model.model_fields.get(str(part))
        model = _model_of(field.annotation) if field else None
    if model is None:
        return ""
    choices = [k for k in model.model_fields if k != "source"]
    close = difflib.get_close_matches(key, choices, n=1, cutoff=0.5)
    known = ", ".join(choices)
    return (f" Did you mean '{close[0]}'?" if close else "") + f" Known keys: {known}."


def _model_of(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()):
        found = _model_of(arg)
        if found is not None:
            return found
    return None


# --------------------------------------------------------------------------------------------
# the original pipeline's layout

_LEGACY_CHIPS = {
    "chip_size": "size",
    "overlap": "overlap",
    "min_valid_pixels": "min_valid_fraction",
    "max_sat_nan_fraction": "max_nan_fraction",
}


_LEGACY_TRAIN = {
    "batch_size": "batch_size",
    "num_epochs": "epochs",
    "base_learning_rate": "learning_rate",
    "weight_decay": "weight_decay",
    "early_stopping_patience": "patience",
    "loss_function": "loss",
    "huber_delta": "huber_delta",
    "spatial_loss_weight": "spatial_loss_weight",
    "use_geometric_aug": "augment",
    "use_spectral_aug": "spectral_augment",
    "aug_probability": "aug_probability",
    "use_hard_negative_mining": "hard_negative_mining",
    "hard_negative_start_epoch": "hnm_start_epoch",
    "oversampling_factor": "oversampling_factor",
    "use_test_time_augmentation": "tta",
}


def _is_legacy(raw: dict) -> bool:
    pre = raw.get("preprocessing")
    return "raster_pairs" in raw or (isinstance(pre, dict) and "raster_pairs" in pre)


def _legacy_section(value: Any, name: str, where: str) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: '{name}' must be a mapping of settings, got {_short(value)}")
    return dict(value)


def _legacy_sites(pairs: Any, where: str) -> list[dict[str, Any]]:
    """``raster_pairs`` entries as ``sites`` entries, each checked and named in errors."""
    if not isinstance(pairs, list) or not pairs:
        raise ConfigError(
            f"{where}: preprocessing.raster_pairs must be a non-empty list of mappings with "
            f"satellite_path, biomass_path and site_name, got {_short(pairs)}"
        )
    sites = []
    for i, pair in enumerate(pairs):
        at = f"{where}: preprocessing.raster_pairs[{i}]"
        if not isinstance(pair, dict):
            raise ConfigError(
                f"{at} must be a mapping with satellite_path, biomass_path and site_name, got "
                f"{_short(pair)}"
            )
        missing = sorted({"satellite_path", "biomass_path"} - set(pair))
        if missing:
            raise ConfigError(f"{at} lacks {missing}")
        for key in ("satellite_path", "biomass_path"):
            if not isinstance(pair[key], str) or not pair[key].strip():
                raise ConfigError(f"{at}.{key} must be a file path, got {_short(pair[key])}")
        name = pair.get("site_name")
        if name is not None and not isinstance(name, str | int):
            raise ConfigError(f"{at}.site_name must be a name, got {_short(name)}")
        sites.append(
            {
                "name": str(name or Path(pair["satellite_path"]).stem),
                "satellite": pair["satellite_path"],
                "biomass": pair["biomass_path"],
            }
        )
    return sites


def _translate_legacy(raw: dict, where: str) -> dict:
    """Map the original pipeline's ``preprocessing``/``training`` layout onto ours."""
    pre = _legacy_section(raw.get("preprocessing", raw), "preprocessing", where)
    training = _legacy_section(raw.get("training"), "training", where)
    sites = _legacy_sites(pre.pop("raster_pairs", None), where)
    chips = {new: pre.pop(old) for old, new in _LEGACY_CHIPS.items() if old in pre}
    folds: dict[str, Any] = {}
    if "n_folds" in training:
        folds["n_folds"] = training.pop("n_folds")
    if "spatial_buffer" in training:
        warnings.warn(
            f"{where}: training.spatial_buffer={training.pop('spatial_buffer')} is in the "
            "rasters' coordinate units (degrees on EPSG:4326) and was never applied by the "
            "original pipeline; agbcube uses folds.buffer_m (metres, default 'auto' from a "
            "variogram) instead.",
            UserWarning,
            stacklevel=3,
        )
    train = {new: training.pop(old) for old, new in _LEGACY_TRAIN.items() if old in training}
    if "tta_samples" in training:  # augmented copies besides the original
        samples = training.pop("tta_samples")
        if isinstance(samples, bool) or not isinstance(samples, int) or samples < 0:
            raise ConfigError(
                f"{where}: training.tta_samples must be a whole number >= 0, got {_short(samples)}"
            )
        train["tta_rotations"] = min(8, samples + 1)
    if "use_log_transform" in pre:
        train["log_target"] = bool(pre.pop("use_log_transform"))
    if training.get("model_type") == "cnn_coordinate":
        training.pop("model_type")
        train["model"] = "cnn-coordinate"
    ignored = sorted(
        [f"preprocessing.{k}" for k in pre if k not in {"preprocessing", "training"}]
        + [f"training.{k}" for k in training]
    )
    if ignored:
        warnings.warn(
            f"{where}: original-pipeline settings with no agbcube equivalent were ignored: "
            + ", ".join(ignored),
            UserWarning,
            stacklevel=3,
        )
    out: dict[str, Any] = {"sites": sites}
    if chips:
        out["chips"] = chips
    if folds:
        out["folds"] = folds
    if train:
        out["train"] = train
    for section in ("cube",):
        if section in raw:
            out[section] = raw[section]
    return out


# --------------------------------------------------------------------------------------------
# reference documentation


def config_reference() -> str:
    """Markdown reference of every configuration key, generated from the models.

    The documentation's configuration page is generated from here when the site is built
    (``docs/gen_pages.py``), so it cannot drift from the code. The ``train`` settings are
    listed by group (model, optimisation, augmentation, evaluation, data path), so a user sees
    which ones matter.
    """
    sections = [
        ("sites[]", SiteConfig),
        ("sites[].satellite (STAC)", StacSource),
        ("cube", CubeConfig),
        ("cube.grid (explicit)", GridSpec),
        ("chips", ChipsConfig),
        ("folds", FoldsConfig),
    ]
    out = [_reference_table(title, model.model_fields) for title, model in sections]
    groups: dict[str, dict[str, Any]] = {}
    for name, field in TrainConfig.model_fields.items():
        group = (field.json_schema_extra or {}).get("group", "other")
        groups.setdefault(str(group), {})[name] = field
    for group, fields in groups.items():
        out.append(_reference_table(f"train: {group}", fields))
    return "\n".join(out)


def _reference_table(title: str, fields: dict[str, Any]) -> str:
    rows = [f"### `{title}`\n\n| key | default | description |\n|---|---|---|"]
    for name, field in fields.items():
        if field.is_required():
            default = "required"
        elif field.default_factory is not None:
            default = "(section defaults)"
        else:
            default = f"`{_yaml_scalar(field.default)}`"
        rows.append(f"| `{name}` | {default} | {field.description or ''} |")
    return "\n".join(rows) + "\n"


def _yaml_scalar(value: Any) -> str:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, tuple):
        value = list(value)
    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()
