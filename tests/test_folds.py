from __future__ import annotations

import warnings

import geopandas as gpd
import numpy as np
import pandas as pd
import pytest
import shapely
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from agbcube.errors import FoldError
from agbcube.folds import HybridSiteSpatialKFold

CRS = "EPSG:32643"


def chip_layout(
    n_sites: int = 2, ny: int = 10, nx: int = 12, *, size_m=100.0, stride_m=100.0, drop=0.0, seed=0
) -> gpd.GeoDataFrame:
    """Chips on a grid per site (sites 100 km apart), some dropped at random."""
    rng = np.random.default_rng(seed)
    parts = []
    for s in range(n_sites):
        rr, cc = np.meshgrid(np.arange(ny), np.arange(nx), indexing="ij")
        keep = rng.random(rr.size) >= drop
        x0 = 500_000 + s * 100_000 + cc.ravel()[keep] * stride_m
        y0 = 2_400_000 - rr.ravel()[keep] * stride_m
        parts.append(
            gpd.GeoDataFrame(
                {"site": f"s{s}", "row": rr.ravel()[keep], "col": cc.ravel()[keep]},
                geometry=shapely.box(x0, y0 - size_m, x0 + size_m, y0),
                crs=CRS,
            )
        )
    return pd.concat(parts, ignore_index=True)


def _check_invariants(chips, roles, n_folds, buffer_m):
    fold = roles["fold"].to_numpy()
    # a true partition: every chip in exactly one test fold
    assert set(np.unique(fold)) <= set(range(n_folds)) and (fold >= 0).all()
    for k in range(n_folds):
        role = roles[f"role_{k}"].to_numpy()
        assert set(role) <= {"train", "val", "test", "buffer"}
        np.testing.assert_array_equal(role == "test", fold == k)
        for site in chips.site.unique():
            in_site = (chips.site == site).to_numpy()
            if in_site.sum() >= n_folds:
                assert (in_site & (role == "test")).any(), f"fold {k} lacks site {site}"
            geoms = chips.geometry.to_numpy()
            test = geoms[in_site & (role == "test")]
            used = geoms[in_site & np.isin(role, ["train", "val"])]
            train = geoms[in_site & (role == "train")]
            val = geoms[in_site & (role == "val")]
            # independent brute-force geometry: every pair, no index
            for a, b in ((test, used), (val, train)):
                if len(a) and len(b):
                    d = shapely.distance(a[:, None], b[None, :])
                    inter = shapely.area(shapely.intersection(a[:, None], b[None, :]))
                    assert (inter == 0).all()
                    if buffer_m > 0:
                        assert d.min() > buffer_m


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    n_sites=st.integers(1, 3),
    ny=st.integers(4, 12),
    nx=st.integers(4, 12),
    n_folds=st.integers(2, 5),
    buffer_m=st.sampled_from([0.0, 50.0, 150.0]),
    overlap=st.booleans(),
    drop=st.sampled_from([0.0, 0.2]),
    seed=st.integers(0, 10_000),
)
def test_partition_buffer_and_determinism(n_sites, ny, nx, n_folds, buffer_m, overlap, drop, seed):
    chips = chip_layout(n_sites, ny, nx, stride_m=90.0 if overlap else 100.0, drop=drop, seed=seed)
    counts = chips.site.value_counts()
    cv = HybridSiteSpatialKFold(n_folds, buffer_m=buffer_m, random_state=seed)
    if (counts < n_folds).any():
        with pytest.raises(FoldError, match="fewer than n_folds"):
            cv.assign(chips)
        return
    try:
        roles = cv.assign(chips)
    except FoldError as err:  # a buffer may leave no training chips on tiny layouts
        assert "leaves no training chips" in str(err) and "fold" in str(err)
        return
    _check_invariants(chips, roles, n_folds, buffer_m)
    again = HybridSiteSpatialKFold(n_folds, buffer_m=buffer_m, random_state=seed).assign(chips)
    pd.testing.assert_frame_equal(roles, again)


def test_balanced_share_of_every_site():
    chips = chip_layout(3, 12, 12, drop=0.1, seed=3)
    roles = HybridSiteSpatialKFold(5, buffer_m=0.0, random_state=0).assign(chips)
    table = pd.crosstab(chips.site, roles.fold)
    share = table.div(table.sum(axis=1), axis=0)
    assert (share.to_numpy() > 0.1).all() and (share.to_numpy() < 0.3).all()


def test_sklearn_splitter_api():
    from sklearn.linear_model import LinearRegression
    from sklearn.model_selection import cross_val_score

    chips = chip_layout(2, 10, 10)
    cv = HybridSiteSpatialKFold(4, buffer_m=100.0, validation_fraction=0.0, random_state=1)
    assert cv.get_n_splits() == 4
    splits = list(cv.split(chips))
    assert len(splits) == 4
    tests = np.concatenate([t for _, t in splits])
    np.testing.assert_array_equal(np.sort(tests), np.arange(len(chips)))
    for train, test in splits:
        assert train.dtype.kind == "i" and not set(train) & set(test)
    X = np.column_stack([chips.row, chips.col])
    y = chips.row * 2.0 + 1
    scores = cross_val_score(LinearRegression(), X, y, cv=splits)
    assert np.allclose(scores, 1.0)
    train, val, test = next(cv.split_with_validation(chips))
    assert len(val) == 0  # validation_fraction=0
    # groups override the site column
    roles = cv.assign(chips.drop(columns="site"), groups=chips.site.to_numpy())
    assert (roles.fold >= 0).all()


def test_validation_is_spatially_separate():
    chips = chip_layout(1, 14, 14)
    cv = HybridSiteSpatialKFold(3, buffer_m=150.0, validation_fraction=0.2, random_state=0)
    roles = cv.assign(chips)
    for k in range(3):
        role = roles[f"role_{k}"]
        n_val, n_pool = (role == "val").sum(), role.isin(["train", "val"]).sum()
        assert n_val > 0 and n_val < n_pool
    _check_invariants(chips, roles, 3, 150.0)


def test_errors_name_site_and_numbers():
    chips = chip_layout(1, 2, 2)
    with pytest.raises(FoldError, match="site 's0' has 4 chips, fewer than n_folds=5"):
        HybridSiteSpatialKFold(5).assign(chips)
    chips = chip_layout(1, 6, 6)
    with pytest.raises(FoldError, match=r"site 's0', fold \d: the buffer of 5000 m leaves no"):
        HybridSiteSpatialKFold(3, buffer_m=5000.0).assign(chips)
    with pytest.raises(FoldError, match="GeoDataFrame"):
        HybridSiteSpatialKFold(3).assign(pd.DataFrame({"site": ["a"]}))


def test_a_site_with_fewer_chips_than_clusters():
    """9 chips a site where 3 folds × 4 clusters want 12: still a balanced true partition."""
    chips = chip_layout(2, 3, 3)
    roles = HybridSiteSpatialKFold(3, clusters_per_fold=4, random_state=0).assign(chips)
    _check_invariants(chips, roles, 3, 0.0)
    for site in ("s0", "s1"):
        counts = roles.loc[(chips.site == site).to_numpy(), "fold"].value_counts()
        assert sorted(counts) == [3, 3, 3]


def test_another_layout_rescues_a_site_the_first_one_buffers_away():
    """Where a region falls decides how much its buffer ring takes: the next layouts are tried."""
    from types import SimpleNamespace

    from agbcube.folds.stage import _auto_buffer, _first_layout, _train_share

    chips = chip_layout(1, 7, 7)
    cfg = SimpleNamespace(
        n_folds=4,
        validation_fraction=0.15,
        clusters_per_fold=4,
        seed=0,
        min_train_fraction=0.1,
        min_buffer_m=100.0,
    )
    with pytest.raises(FoldError, match="leaves no training chips"):
        HybridSiteSpatialKFold(4, buffer_m=100.0, layout=0).assign(chips)
    layout = _first_layout(chips, 100.0, cfg)
    assert layout > 0 and _train_share(chips, 100.0, cfg, layout) >= 0.1
    assert all(_train_share(chips, 100.0, cfg, k) < 0.1 for k in range(layout))
    assert _auto_buffer(chips, 100.0, cfg) == (100.0, layout)
    roles = HybridSiteSpatialKFold(4, buffer_m=100.0, layout={"s0": layout}).assign(chips)
    _check_invariants(chips, roles, 4, 100.0)
    # layout 0 is the splitter's default: the same folds as before layouts existed
    pd.testing.assert_frame_equal(
        HybridSiteSpatialKFold(3, buffer_m=50.0, layout=0).assign(chip_layout(2, 6, 6)),
        HybridSiteSpatialKFold(3, buffer_m=50.0).assign(chip_layout(2, 6, 6)),
    )


def test_training_pool_is_every_chip_beyond_the_test_buffer():
    from agbcube.folds import training_pool

    chips = chip_layout(2, 10, 12)
    roles = HybridSiteSpatialKFold(3, buffer_m=150.0, random_state=0).assign(chips)
    folds = gpd.GeoDataFrame(pd.concat([chips, roles], axis=1), crs=chips.crs)
    folds.attrs["agbcube"] = {"buffer_m": {"s0": 150.0, "s1": 150.0}}
    geoms = folds.geometry.to_numpy()
    for k in range(3):
        role = folds[f"role_{k}"].to_numpy()
        pool = np.zeros(len(folds), bool)
        pool[training_pool(folds, k)] = True
        assert pool[np.isin(role, ["train", "val"])].all()  # train and val are in it
        assert not pool[role == "test"].any()
        assert (pool & (role == "buffer")).any()  # and the ring around validation
        for site in ("s0", "s1"):
            here = (folds.site == site).to_numpy()
            d = shapely.distance(geoms[here & pool][:, None], geoms[here & (role == "test")])
            assert d.min() > 150.0
            # nothing else is beyond the buffer: the pool is all of it
            rest = here & ~pool & (role != "test")
            assert (
                shapely.distance(geoms[rest][:, None], geoms[here & (role == "test")]).min(1)
                <= 150.0
            ).all()
    # folds without their buffers: training and validation chips
    folds.attrs = {}
    role = folds["role_0"].to_numpy()
    np.testing.assert_array_equal(
        training_pool(folds, 0), np.flatnonzero(np.isin(role, ["train", "val"]))
    )


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    buffer_m=st.sampled_from([0.0, 60.0, 110.0, 160.0]),
    validation=st.booleans(),
    seed=st.integers(0, 50),
)
def test_label_mask_keeps_exactly_the_pixels_beyond_the_buffer(buffer_m, validation, seed):
    """Brute force, pixel by pixel: a label is kept iff its centre clears every excluded chip."""
    from pyproj import Transformer

    from agbcube.folds import label_mask

    chips = chip_layout(2, 9, 10, drop=0.1, seed=seed)
    try:
        roles = HybridSiteSpatialKFold(3, buffer_m=buffer_m, random_state=seed).assign(chips)
    except FoldError:  # a buffer too wide for this layout: nothing to check
        assume(False)
    folds = gpd.GeoDataFrame(pd.concat([chips, roles], axis=1), crs=chips.crs)
    folds.attrs["agbcube"] = {"buffer_m": {"s0": buffer_m, "s1": buffer_m}}
    px = 4  # 25 m pixels in 100 m chips
    b = folds.geometry.bounds.to_numpy()
    step = (b[:, 2] - b[:, 0]) / px
    centre = (np.arange(px) + 0.5)[None, :] * step[:, None]
    xx = np.broadcast_to((b[:, 0, None] + centre)[:, None, :], (len(folds), px, px))
    yy = np.broadcast_to((b[:, 3, None] - centre)[:, :, None], (len(folds), px, px))
    lon, lat = Transformer.from_crs(CRS, 4326, always_xy=True).transform(xx, yy)
    k = seed % 3
    pos, mask, nearest = label_mask(folds, k, np.stack([lon, lat], axis=1), validation=validation)
    role = folds[f"role_{k}"].to_numpy()
    excluded = (role == "test") | ((role == "val") if validation else False)
    assert not excluded[pos].any()
    # every chip the roles allow is in, whole
    allowed = np.flatnonzero(np.isin(role, ["train"] if validation else ["train", "val"]))
    assert set(allowed) <= set(pos)
    assert mask[np.isin(pos, allowed)].all()
    geoms = folds.geometry.to_numpy()
    sites = folds["site"].to_numpy()
    for j, i in enumerate(pos):
        src = geoms[excluded & (sites == sites[i])]
        if len(src) == 0:
            assert mask[j].all()
            continue
        pts = shapely.points(xx[i].ravel(), yy[i].ravel())
        d = shapely.distance(pts[:, None], src[None, :]).min(1).reshape(px, px)
        np.testing.assert_array_equal(mask[j], d > buffer_m)
        assert mask[j].mean() >= 0.25
        if mask[j].any():
            assert d[mask[j]].min() >= nearest - 1e-6
    if mask.any() and np.isfinite(nearest):
        assert nearest > buffer_m


def test_geographic_chips_use_metres():
    """On EPSG:4326 a buffer of 150 m must act in metres, not degrees."""
    chips = chip_layout(1, 10, 10).to_crs(4326)
    roles = HybridSiteSpatialKFold(3, buffer_m=150.0, random_state=0).assign(chips)
    assert (roles[[f"role_{k}" for k in range(3)]] == "buffer").any().all()
    _check_invariants(chips.to_crs(CRS), roles, 3, 150.0)


# --- the stage on a built cube ------------------------------------------------------------


def test_make_folds_on_demo_cube(demo_config, tmp_path):
    import json

    from agbcube.folds import make_folds, read_folds, write_folds

    folds = make_folds(demo_config)
    meta = folds.attrs["agbcube"]
    assert set(meta["buffer_m"]) == {"alpha", "beta", "gamma"}
    for site, v in meta["variograms"].items():
        assert v["range_m"] > 0 and meta["buffer_m"][site] > 0
    assert meta["audit"]["tested_once"]
    cols = {
        "chip_id",
        "site",
        "row",
        "col",
        "agb_mean",
        "valid_fraction",
        "nan_fraction",
        "geometry",
        "fold",
        "role_0",
        "role_1",
        "role_2",
    }
    assert cols <= set(folds.columns)
    for site, buffer in meta["buffer_m"].items():
        sub = folds[folds.site == site]
        _check_invariants(sub.to_crs(sub.estimate_utm_crs()), sub, 3, buffer * 0.999)
    paths = write_folds(folds, tmp_path / "f" / "folds.parquet")
    assert [p.name for p in paths] == [
        "folds.parquet",
        "folds_audit.json",
        "folds_map_alpha.png",
        "folds_map_beta.png",
        "folds_map_gamma.png",
    ]
    back = read_folds(tmp_path / "f" / "folds.parquet")
    assert back.crs.to_epsg() == 4326 and len(back) == len(folds)
    assert back.attrs["agbcube"]["buffer_m"] == pytest.approx(meta["buffer_m"])
    audit = json.loads((tmp_path / "f" / "folds_audit.json").read_text())
    assert len(audit["audit"]["folds"]) == 3 * 3
    assert (tmp_path / "f" / "folds_map_beta.png").read_bytes()[:4] == b"\x89PNG"
    # deterministic for a seed
    again = make_folds(demo_config)
    pd.testing.assert_frame_equal(
        pd.DataFrame(again.drop(columns="geometry")), pd.DataFrame(folds.drop(columns="geometry"))
    )


def test_folds_cli(demo_config, tmp_path):
    import yaml
    from typer.testing import CliRunner

    from agbcube.cli import app

    raw = yaml.safe_load((demo_config.source).read_text())
    raw["cube"]["output"] = str(demo_config.cube.output)
    raw["folds"]["output"] = str(tmp_path / "cli" / "folds.parquet")
    raw["folds"]["buffer_m"] = 300
    for site in raw["sites"]:
        for key in ("satellite", "biomass"):
            site[key] = str(demo_config.source.parent / site[key])
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(raw))
    result = CliRunner().invoke(app, ["folds", str(cfg), "--no-maps"])
    assert result.exit_code == 0, result.output
    assert "every chip tested exactly once: True" in result.output
    assert (tmp_path / "cli" / "folds.parquet").exists()
    assert not (tmp_path / "cli" / "folds_map_alpha.png").exists()


# --- reliability: causes of "no chip", validated folds files, folds tied to their cube ---------


def _small_config(tmp_path, rng, *, sites=("a", "b"), agb_range=(0.0, 600.0), nodata=None):
    from agbcube.config import parse_config
    from tests.conftest import write_raster

    entries = []
    for name in sites:
        stack = rng.uniform(100, 3000, (2, 48, 48)).astype("float32")
        if nodata is not None and name == sites[-1]:
            stack[:] = nodata  # every feature value is nodata
        sat = write_raster(tmp_path / f"{name}_sat.tif", stack, descriptions=["B4", "B8"])
        agb = write_raster(
            tmp_path / f"{name}_agb.tif", rng.uniform(10, 300, (48, 48)).astype("f4")
        )
        entries.append({"name": name, "satellite": str(sat), "biomass": str(agb)})
        if nodata is not None:
            entries[-1]["satellite_nodata"] = nodata
    return parse_config(
        {
            "sites": entries,
            "cube": {"output": str(tmp_path / "cube.zarr"), "chunks": 16, "indices": "none",
                     "agb_range": list(agb_range)},
            "chips": {"size": 8, "overlap": 0.0},
            "folds": {"n_folds": 3, "buffer_m": 0, "output": str(tmp_path / "f" / "folds.parquet")},
        }
    )  # fmt: skip


def _built(cfg):
    import warnings

    from agbcube.cube import build_cube

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the empty-site warnings are build-cube's own tests
        build_cube(cfg.sites, cfg.cube, progress=False)
    return cfg


@pytest.mark.parametrize(
    ("change", "cause"),
    [
        ({"chips": {"size": 60}}, r"the chip \(60×60 px, chips.size\) is larger than the site "
         r"\(48×48 px\); lower chips.size"),
        ({"cube": {"agb_range": [1000.0, 2000.0]}}, r"its AGB is NaN everywhere .*agb_range"),
        ({"nodata": -1.0}, r"its feature bands are all NaN .*satellite_nodata"),
        ({"chips": {"size": 8, "min_valid_fraction": 1.0, "max_nan_fraction": 0.0}}, None),
    ],
)  # fmt: skip
def test_no_usable_chip_names_the_real_cause(tmp_path, rng, change, cause):
    from agbcube.folds import make_folds

    cfg = _small_config(
        tmp_path, rng, sites=("only",), nodata=change.get("nodata"),
        agb_range=tuple(change.get("cube", {}).get("agb_range", (0.0, 600.0))),
    )  # fmt: skip
    cfg = cfg.model_copy(update={"chips": cfg.chips.model_copy(update=change.get("chips", {}))})
    _built(cfg)
    if cause is None:  # every chip passes: nothing to explain
        assert len(make_folds(cfg)) == 36
        return
    with (
        pytest.raises(FoldError, match=f"no site has a usable chip. site 'only': {cause}"),
        warnings.catch_warnings(record=True) as caught,
    ):
        warnings.simplefilter("always")
        make_folds(cfg)
    assert not caught  # the error names every site's cause: no warning says it first


def test_a_site_without_chips_is_left_out_with_its_cause(tmp_path, rng):
    from agbcube.folds import make_folds

    cfg = _built(_small_config(tmp_path, rng, sites=("good", "blank"), nodata=-1.0))
    with pytest.warns(UserWarning, match="site 'blank' has no usable chip .*all NaN"):
        folds = make_folds(cfg)
    assert set(folds["site"]) == {"good"}
    summary = folds.attrs["agbcube"]["chip_summary"]
    assert summary["blank"]["kept"] == 0 and summary["blank"]["dropped_nan_features"] == 36


@pytest.mark.slow
def test_folds_made_on_a_cluster_equal_those_made_in_process(
    demo_config, local_cluster, started_tasks, tmp_path, rng
):
    """Each site is a task on the workers; the chips, roles, metadata and warnings are the
    in-process ones."""
    from distributed import Client

    from agbcube.folds import make_folds

    here = make_folds(demo_config)
    empty = _built(_small_config(tmp_path, rng, sites=("good", "blank"), nodata=-1.0))
    with Client(local_cluster) as client:
        there = make_folds(demo_config, client=client)
        with pytest.warns(UserWarning, match="site 'blank' has no usable chip .*all NaN"):
            partial = make_folds(empty, client=client)
    assert there.crs == here.crs
    pd.testing.assert_frame_equal(pd.DataFrame(there), pd.DataFrame(here))
    assert there.attrs == here.attrs
    sites = sorted(k.rsplit("-", 1)[0] for k, _ in started_tasks)
    assert sites == [f"folds/{s}" for s in ("alpha", "beta", "blank", "gamma", "good")]
    assert set(partial["site"]) == {"good"}
    assert partial.attrs["agbcube"]["chip_summary"]["blank"]["kept"] == 0


def test_folds_use_the_config_sites_not_every_site_of_the_cube(tmp_path, rng):
    from agbcube.errors import CubeError
    from agbcube.folds import make_folds

    cfg = _built(_small_config(tmp_path, rng, sites=("a", "b")))
    only_a = cfg.model_copy(update={"sites": cfg.sites[:1]})
    assert set(make_folds(only_a)["site"]) == {"a"}
    renamed = cfg.model_copy(update={"sites": [cfg.sites[0].model_copy(update={"name": "z"})]})
    with pytest.raises(CubeError, match=r"has no site \['z'\] of the config .*build-cube"):
        make_folds(renamed)


@pytest.fixture(scope="module")
def _folds_once(tmp_path_factory):
    from agbcube.folds import make_folds, write_folds

    cfg = _built(_small_config(tmp_path_factory.mktemp("folds"), np.random.default_rng(0)))
    write_folds(make_folds(cfg), cfg.folds.output, maps=False)
    return cfg


@pytest.fixture
def folds_file(_folds_once, tmp_path):
    """A two-site cube and its folds, a private copy per test (mtimes kept: copytree)."""
    import json
    import shutil

    import pyarrow.parquet as pq

    cfg = _folds_once
    cube, folds = tmp_path / "cube.zarr", tmp_path / "f" / "folds.parquet"
    shutil.copytree(cfg.cube.output, cube)
    folds.parent.mkdir()
    table = pq.read_table(cfg.folds.output)  # the copy records the copied cube
    meta = json.loads(table.schema.metadata[b"agbcube"])
    meta["cube"]["store"] = str(cube)
    extra = {b"agbcube": json.dumps(meta).encode()}
    pq.write_table(table.replace_schema_metadata({**table.schema.metadata, **extra}), folds)
    cube_cfg = cfg.cube.model_copy(update={"output": cube})
    folds_cfg = cfg.folds.model_copy(update={"output": folds})
    return cfg.model_copy(update={"cube": cube_cfg, "folds": folds_cfg})


def _rewrite(path, fn):
    """The folds table changed by ``fn`` and written back as GeoParquet (metadata kept)."""
    import pyarrow.parquet as pq

    from agbcube.folds import read_folds

    meta = pq.read_schema(path).metadata
    gdf = fn(read_folds(path))
    gdf.attrs = {}
    gdf.to_parquet(path)
    table = pq.read_table(path)
    pq.write_table(
        table.replace_schema_metadata({**table.schema.metadata, b"agbcube": meta[b"agbcube"]}), path
    )


@pytest.mark.parametrize(
    ("mutate", "match"),
    [
        (lambda g: g.drop(columns="role_1"), r"lacks columns: needs chip_id, site, row, col, fold"),
        (lambda g: g.drop(columns=["role_0", "role_1", "role_2"]), "lacks columns"),
        (lambda g: g.drop(columns="fold"), "lacks columns"),
        (lambda g: pd.concat([g, g.iloc[:3]]), r"lists chips more than once: \['a:0:0'"),
        (lambda g: g.assign(chip_id="same"), r"lists chips more than once: \['same'\]"),
        (lambda g: g.assign(role_0=g["role_0"].replace("train", "training")),
         r"column role_0 holds \['training'\], not one of \['train', 'val', 'test', 'buffer'\]"),
        (lambda g: g.assign(role_2=g["role_2"].replace("val", "validation")),
         r"column role_2 holds \['validation'\]"),
        (lambda g: g.assign(fold=7), r"'fold' must hold 0…2"),
        (lambda g: g.assign(row=-g["row"] - 1), r"row/col non-negative"),
        (lambda g: g.assign(fold=(g["fold"] + 1) % 3), r"'test' in exactly its own fold"),
        (lambda g: g.assign(role_1=g["role_1"].replace("train", "buffer")),
         r"fold\(s\) \[1\] have no training chip"),
    ],
)  # fmt: skip
def test_a_malformed_folds_file_is_refused(folds_file, mutate, match):
    from agbcube.folds import read_folds

    path = folds_file.folds.output
    _rewrite(path, mutate)
    before = path.read_bytes()
    with pytest.raises(FoldError, match=f"folds file {path}.*{match}"):
        read_folds(path)
    assert path.read_bytes() == before


@pytest.mark.parametrize("kind", ["no geometry", "not parquet", "folder", "bad metadata"])
def test_a_folds_file_that_is_not_a_folds_table_is_refused(folds_file, tmp_path, kind):
    import pyarrow.parquet as pq

    from agbcube.folds import read_folds

    path = tmp_path / "other.parquet"
    if kind == "no geometry":
        pd.DataFrame(read_folds(folds_file.folds.output).drop(columns="geometry")).to_parquet(path)
        match = "is not a GeoParquet table of chips"
    elif kind == "not parquet":
        path.write_text("chip_id,site\n")
        match = "is not a GeoParquet table of chips"
    elif kind == "folder":
        path.mkdir()
        match = "is a folder"
    else:
        table = pq.read_table(folds_file.folds.output)
        pq.write_table(
            table.replace_schema_metadata({**table.schema.metadata, b"agbcube": b"{"}), path
        )
        match = "its 'agbcube' metadata is not JSON"
    with pytest.raises(FoldError, match=f"folds file {path}.*{match}"):
        read_folds(path)


def test_folds_cut_from_an_earlier_build_of_the_cube_are_refused(folds_file):
    from agbcube.cube import build_cube
    from agbcube.folds import check_folds_cube, make_folds, read_folds, write_folds

    cfg = folds_file
    folds = read_folds(cfg.folds.output)  # the cube is as it was: fine
    rebuilt = cfg.cube.model_copy(update={"agb_range": (50.0, 600.0)})
    build_cube(cfg.sites, rebuilt, progress=False)  # same store, other settings
    stale = r"were cut from an earlier build of cube .*site\(s\) \['a', 'b'\] .*agbcube folds"
    with pytest.raises(FoldError, match=f"folds {cfg.folds.output} {stale}"):
        read_folds(cfg.folds.output)
    with pytest.raises(FoldError, match=stale):
        check_folds_cube(folds, cfg.cube.output)
    with pytest.raises(FoldError, match=stale):
        read_folds(cfg.folds.output, cube=cfg.cube.output)
    fresh = cfg.model_copy(update={"cube": rebuilt})
    write_folds(make_folds(fresh), cfg.folds.output, maps=False)
    assert len(read_folds(cfg.folds.output)) > 0


def test_a_damaged_cube_chunk_names_the_site_when_cutting_chips(folds_file):
    from agbcube.errors import CubeError
    from agbcube.folds import make_folds

    chunk = next((folds_file.cube.output / "b" / "agb").glob("0.*"))
    chunk.write_bytes(b"\x00garbage" * 20)
    with pytest.raises(CubeError, match=r"site 'b': its data cannot be read .*build-cube"):
        make_folds(folds_file)


@pytest.mark.parametrize("where", ["folder", "foreign file", "foreign audit", "foreign map"])
def test_write_folds_never_replaces_what_agbcube_did_not_write(folds_file, tmp_path, where):
    from agbcube.errors import OutputExistsError
    from agbcube.folds import read_folds, write_folds

    folds = read_folds(folds_file.folds.output)
    out = tmp_path / "out" / "folds.parquet"
    out.parent.mkdir()
    victim = {
        "folder": out,
        "foreign file": out,
        "foreign audit": out.with_name("folds_audit.json"),
        "foreign map": out.with_name("folds_map_b.png"),
    }[where]
    if where == "folder":
        victim.mkdir()
        (victim / "precious.csv").write_text("1,2,3")
    else:
        victim.write_text("the user's own")
    before = sorted(p.name for p in out.parent.rglob("*"))
    with pytest.raises(OutputExistsError, match=f"{victim}"):
        write_folds(folds, out, maps=where == "foreign map")
    assert sorted(p.name for p in out.parent.rglob("*")) == before  # nothing written at all
    if where == "folder":
        assert (victim / "precious.csv").read_text() == "1,2,3"
        for _ in range(2):  # agbcube's own outputs are replaced freely
            write_folds(folds, tmp_path / "ok" / "folds.parquet", maps=False)
    else:
        assert victim.read_text() == "the user's own"


def test_an_interrupted_folds_write_leaves_the_previous_folds_and_maps(
    folds_file, tmp_path, monkeypatch
):
    import agbcube.folds.io as folds_io
    from agbcube.folds import read_folds, write_folds

    folds = read_folds(folds_file.folds.output)
    out = tmp_path / "out" / "folds.parquet"
    write_folds(folds, out)
    before = {p.name: p.read_bytes() for p in out.parent.iterdir()}
    assert {"folds.parquet", "folds_audit.json", "folds_map_a.png", "folds_map_b.png"} <= set(
        before
    )
    real, drawn = folds_io.plot_fold_map, []

    def interrupted(folds, site, *args, **kwargs):  # Ctrl-C while the second map is drawn
        if drawn:
            raise KeyboardInterrupt
        drawn.append(site)
        return real(folds, site, *args, **kwargs)

    monkeypatch.setattr(folds_io, "plot_fold_map", interrupted)
    newer = folds.assign(cluster=folds["cluster"] + 1)
    newer.attrs = folds.attrs
    with pytest.raises(KeyboardInterrupt):
        write_folds(newer, out)
    assert {p.name: p.read_bytes() for p in out.parent.iterdir()} == before  # no temporaries
    monkeypatch.undo()
    write_folds(folds, out, maps=False)  # the earlier maps would not be of these folds
    assert sorted(p.name for p in out.parent.iterdir()) == ["folds.parquet", "folds_audit.json"]
