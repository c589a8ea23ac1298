from __future__ import annotations

import numpy as np
import pytest
import xarray as xr

from agbcube.bands import BAND_PRESETS, resolve_band_names
from agbcube.errors import BandError
from agbcube.indices import compute_indices, plan_indices

MS59 = list(BAND_PRESETS["multisensor-59"])


def test_preset_matches_benchmark_layout():
    assert len(MS59) == 59
    assert MS59[:3] == ["B2_T1", "B3_T1", "B4_T1"]
    assert MS59[30] == "SR_B2_T1" and MS59[48:50] == ["VV_T1", "VH_T1"]
    assert MS59[-5:] == ["PAL_HH", "PAL_HV", "dem", "slope", "CH"]


def test_band_names_from_descriptions_config_and_preset():
    assert resolve_band_names(2, ("a", "b"), None, source="s") == ["a", "b"]
    assert resolve_band_names(2, (None, None), ["x", "y"], source="s") == ["x", "y"]
    assert resolve_band_names(59, (None,) * 59, "multisensor-59", source="s") == MS59


def test_band_name_errors():
    with pytest.raises(BandError, match="has 3 bands but `bands:` in the config gives 2"):
        resolve_band_names(3, (None,) * 3, ["a", "b"], source="site 'x'")
    with pytest.raises(BandError, match="no descriptions.*multisensor-59"):
        resolve_band_names(2, (None, None), None, source="s")
    with pytest.raises(BandError, match="bands \\[2\\] have no description"):
        resolve_band_names(2, ("a", None), None, source="s")
    with pytest.raises(BandError, match="unknown band preset 'ms59'"):
        resolve_band_names(59, (None,) * 59, "ms59", source="s")
    with pytest.raises(BandError, match="repeat.*\\['a'\\]"):
        resolve_band_names(2, ("a", "a"), None, source="s")
    with pytest.raises(BandError, match="has 58 bands but preset 'multisensor-59' gives 59"):
        resolve_band_names(58, (None,) * 58, "multisensor-59", source="s")


def test_auto_plan_for_multisensor_59():
    names = [s.name for s in plan_indices(MS59, "auto")]
    for season in ("T1", "T2", "T3"):
        for fam in ("NDVI", "EVI", "SAVI", "GNDVI", "NDWI", "NBR", "NDMI"):
            assert f"S2_{fam}_{season}" in names and f"L8_{fam}_{season}" in names
        assert f"S1_VHVV_{season}" in names and f"S1_RVI_{season}" in names
    assert "PAL_HVHH" in names
    assert len(names) == 3 * (7 + 7 + 2) + 1


def test_explicit_requests():
    assert [s.name for s in plan_indices(MS59, ["S2_NDVI_T2"])] == ["S2_NDVI_T2"]
    fam = [s.name for s in plan_indices(MS59, ["ndvi"])]
    assert fam == [f"{s}_NDVI_{t}" for s in ("S2", "L8") for t in ("T1", "T2", "T3")]
    assert plan_indices(MS59, "none") == []


def test_requested_index_with_missing_band_names_it():
    names = ["B2_T1", "B3_T1", "B4_T1", "B8_T1"]
    with pytest.raises(BandError, match=r"'S2_NBR_T1' needs band\(s\) \['B12_T1'\].*B8_T1"):
        plan_indices(names, ["S2_NBR_T1"], source="site 'a'")
    with pytest.raises(BandError, match="index 'NDMI' was requested"):
        plan_indices(names, ["NDMI"])
    with pytest.raises(BandError, match="unknown index 'FOO'"):
        plan_indices(names, ["FOO"])
    # auto silently skips what it cannot compute
    assert {s.family for s in plan_indices(names, "auto")} == {
        "NDVI",
        "EVI",
        "SAVI",
        "GNDVI",
        "NDWI",
    }


def _stack(values: dict[str, float]) -> xr.DataArray:
    data = np.array([[[v]] for v in values.values()], dtype=np.float32)
    return xr.DataArray(data, dims=("band", "y", "x"), coords={"band": list(values)})


def test_index_values_use_the_sensor_scaling():
    s2 = {"B2": 500.0, "B3": 800.0, "B4": 600.0, "B8": 3000.0, "B11": 2000.0, "B12": 1000.0}
    da = _stack({f"{k}_T1": v for k, v in s2.items()})
    out = compute_indices(da, plan_indices(list(da.band.values), "auto"))
    got = {str(b): float(out.sel(band=b).item()) for b in out.band.values}
    b, g, r, n, s1, s2_ = 0.05, 0.08, 0.06, 0.30, 0.20, 0.10
    assert got["S2_NDVI_T1"] == pytest.approx((n - r) / (n + r), rel=1e-5)
    assert got["S2_EVI_T1"] == pytest.approx(2.5 * (n - r) / (n + 6 * r - 7.5 * b + 1), rel=1e-5)
    assert got["S2_SAVI_T1"] == pytest.approx(1.5 * (n - r) / (n + r + 0.5), rel=1e-5)
    assert got["S2_NDWI_T1"] == pytest.approx((g - n) / (g + n), rel=1e-5)
    assert got["S2_NBR_T1"] == pytest.approx((n - s2_) / (n + s2_), rel=1e-5)
    assert got["S2_NDMI_T1"] == pytest.approx((n - s1) / (n + s1), rel=1e-5)

    # Landsat DN: reflectance = DN * 2.75e-5 - 0.2 (EVI depends on the offset)
    l8 = _stack({"SR_B2": 10000.0, "SR_B4": 12000.0, "SR_B5": 20000.0})
    out = compute_indices(l8, plan_indices(list(l8.band.values), ["L8_EVI"]))
    bl, rd, ni = (x * 2.75e-5 - 0.2 for x in (10000.0, 12000.0, 20000.0))
    assert float(out.sel(band="L8_EVI").item()) == pytest.approx(
        2.5 * (ni - rd) / (ni + 6 * rd - 7.5 * bl + 1), rel=1e-5
    )


def test_radar_indices():
    da = _stack({"VV_T1": -10.0, "VH_T1": -16.0, "PAL_HH": 5000.0, "PAL_HV": 2000.0})
    out = compute_indices(da, plan_indices(list(da.band.values), "auto"))
    assert float(out.sel(band="S1_VHVV_T1").item()) == pytest.approx(-6.0)
    vv, vh = 10**-1.0, 10**-1.6
    assert float(out.sel(band="S1_RVI_T1").item()) == pytest.approx(4 * vh / (vv + vh), rel=1e-5)
    hh_db, hv_db = 20 * np.log10(5000) - 83, 20 * np.log10(2000) - 83
    assert float(out.sel(band="PAL_HVHH").item()) == pytest.approx(hv_db - hh_db, rel=1e-5)


def test_indices_are_lazy_and_nan_safe():
    import dask.array as dsa

    data = dsa.from_array(np.array([[[0.0]], [[0.0]]], dtype=np.float32))
    da = xr.DataArray(data, dims=("band", "y", "x"), coords={"band": ["B4", "B8"]})
    out = compute_indices(da, plan_indices(["B4", "B8"], ["NDVI"]))
    assert isinstance(out.data, dsa.Array)
    assert np.isnan(out.compute().values).all()  # 0/0 -> NaN, not inf
