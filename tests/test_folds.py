from __future__ import annotations

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

    from agbcube.folds import _auto_buffer, _first_layout, _train_share

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
