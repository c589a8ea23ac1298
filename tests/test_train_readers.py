"""Readers: every one yields the same chips, with their context, labels and positions."""

from __future__ import annotations

import numpy as np
import pytest

from agbcube.train.readers import (
    ChunkReader,
    MemoryReader,
    XbatcherReader,
    chip_lonlat,
    resolve_bands,
)


def _window(a: np.ndarray, r: int, c: int, s: int) -> np.ndarray:
    """``a[..., r:r+s, c:c+s]`` with NaN where the window leaves ``a`` (r, c may be < 0)."""
    out = np.full((*a.shape[:-2], s, s), np.nan, np.float32)
    ya, yb = max(r, 0), min(r + s, a.shape[-2])
    xa, xb = max(c, 0), min(c + s, a.shape[-1])
    out[..., ya - r : yb - r, xa - c : xb - c] = a[..., ya:yb, xa:xb]
    return out


def _all(reader, positions=None):
    blocks = list(reader.blocks(positions))
    fields = ("x", "agb", "positions")
    x, agb, pos = (np.concatenate([getattr(b, f) for b in blocks]) for f in fields)
    lonlat = np.concatenate([b.lonlat for b in blocks]) if blocks[0].lonlat is not None else None
    return x, agb, lonlat, pos


def test_memory_reader_cuts_the_cube_windows_with_context_and_no_margin_labels(
    demo_config, demo_folds, demo_bands
):
    from agbcube.cube import open_cube

    size, m = demo_config.chips.size, 5
    reader = MemoryReader(
        demo_config.cube.output,
        demo_folds,
        size_px=size,
        bands=demo_bands,
        context_px=m,
        lonlat=True,
    )
    x, agb, lonlat, pos = _all(reader)
    np.testing.assert_array_equal(pos, np.arange(len(demo_folds)))
    assert x.shape == (len(demo_folds), len(demo_bands), size + 2 * m, size + 2 * m)
    edge = np.flatnonzero((demo_folds.row.to_numpy() == 0) | (demo_folds.col.to_numpy() == 0))
    assert edge.size  # some chips touch the site's edge: their context there is NaN
    for i in (0, *edge[:2], len(demo_folds) - 1):
        row = demo_folds.iloc[i]
        ds = open_cube(demo_config.cube.output, row.site)
        r, c = int(row.row) - m, int(row.col) - m
        np.testing.assert_array_equal(x[i], _window(ds.features.values, r, c, size + 2 * m))
        core = ds.agb.values[row.row : row.row + size, row.col : row.col + size]
        np.testing.assert_array_equal(agb[i, m:-m, m:-m], core)
        assert np.isnan(agb[i, :m]).all() and np.isnan(agb[i, :, -m:]).all()  # never a label
        lon = np.broadcast_to(ds.x.values, ds.agb.shape)
        np.testing.assert_allclose(lonlat[i, 0], _window(lon, r, c, size + 2 * m), rtol=1e-6)
    # the chips' own pixels' lon/lat, without reading any data, agree
    ll = chip_lonlat(demo_config.cube.output, demo_folds, size_px=size)
    np.testing.assert_array_equal(ll, lonlat[:, :, m:-m, m:-m])


def test_memory_reader_reads_a_site_in_strips_when_it_is_large(demo_config, demo_folds, demo_bands):
    common = dict(size_px=demo_config.chips.size, bands=demo_bands, context_px=3)
    whole = MemoryReader(demo_config.cube.output, demo_folds, **common)
    strips = MemoryReader(demo_config.cube.output, demo_folds, load_limit_bytes=1, **common)
    np.testing.assert_array_equal(whole.x, strips.x)
    np.testing.assert_array_equal(whole.agb, strips.agb)


@pytest.mark.parametrize("margin", [0, 5])
def test_every_reader_yields_the_same_chips(
    demo_config, demo_folds, demo_bands, small_chunk_cube, margin
):
    """The reference (xbatcher, one chip at a time), the in-memory and the chunked reader."""
    common = dict(size_px=demo_config.chips.size, bands=demo_bands, context_px=margin, lonlat=True)
    stride = max(1, round(demo_config.chips.size * (1 - demo_config.chips.overlap)))
    memory = _all(MemoryReader(demo_config.cube.output, demo_folds, **common))
    rng = np.random.default_rng(4)
    positions = rng.permutation(len(demo_folds))[:50]
    ref = XbatcherReader(demo_config.cube.output, demo_folds, stride_px=stride, **common)
    x, agb, lonlat, pos = _all(ref, positions)
    np.testing.assert_array_equal(pos, positions)  # in the order asked
    np.testing.assert_array_equal(x, memory[0][pos])
    np.testing.assert_array_equal(agb, memory[1][pos])
    np.testing.assert_array_equal(lonlat, memory[2][pos])
    # 20-px tiles: windows span up to three tiles a side, or leave the site
    x, agb, lonlat, pos = _all(ChunkReader(small_chunk_cube, demo_folds, **common), positions)
    np.testing.assert_array_equal(np.sort(pos), np.sort(positions))
    np.testing.assert_array_equal(x, memory[0][pos])
    np.testing.assert_array_equal(agb, memory[1][pos])
    np.testing.assert_array_equal(lonlat, memory[2][pos])


def test_chunk_reader_reads_each_tile_once_and_repeats_chips(
    demo_config, demo_folds, demo_bands, small_chunk_cube
):
    size = demo_config.chips.size
    reader = ChunkReader(small_chunk_cube, demo_folds, size_px=size, bands=demo_bands)
    memory = MemoryReader(demo_config.cube.output, demo_folds, size_px=size, bands=demo_bands)
    rng = np.random.default_rng(0)
    positions = rng.choice(len(demo_folds), size=len(demo_folds) + 17)  # repeats, some absent
    x, agb, _, pos = _all(reader, positions)
    np.testing.assert_array_equal(np.sort(pos), np.sort(positions))
    np.testing.assert_array_equal(x, memory.x[pos])
    np.testing.assert_array_equal(agb, memory.agb[pos])
    tiles = set()
    for p in np.unique(positions):
        r, c, site = demo_folds.row.iloc[p], demo_folds.col.iloc[p], demo_folds.site.iloc[p]
        for ti in range(r // 20, (r + size - 1) // 20 + 1):
            for tj in range(c // 20, (c + size - 1) // 20 + 1):
                tiles.add((site, ti, tj))
    assert reader.tiles_read == len(tiles)


def test_bands_follow_names_and_a_missing_band_is_named(demo_config, demo_folds):
    from agbcube.errors import BandError

    store = demo_config.cube.output
    bands = resolve_bands(store, demo_folds["site"], None)
    assert bands[:2] == ["B2_T1", "B3_T1"]
    picked = ["B8_T1", "B4_T1"]
    reader = MemoryReader(store, demo_folds, size_px=demo_config.chips.size, bands=picked)
    full = MemoryReader(store, demo_folds, size_px=demo_config.chips.size, bands=bands)
    order = [bands.index(b) for b in picked]
    np.testing.assert_array_equal(reader.x, full.x[:, order])
    with pytest.raises(BandError, match=r"lacks band\(s\) \['B99'\]"):
        resolve_bands(store, demo_folds["site"], ["B4_T1", "B99"])


def test_xbatcher_reader_refuses_chips_off_the_grid(demo_config, demo_folds, demo_bands):
    moved = demo_folds.copy()
    moved.loc[moved.index[0], "row"] += 1
    reader = XbatcherReader(
        demo_config.cube.output, moved, size_px=16, stride_px=16, bands=demo_bands
    )
    with pytest.raises(ValueError, match="not on the chip grid"):
        list(reader.blocks(np.array([0])))
