"""The exported ensemble maps a window as `predict` does, with nothing of agbcube installed."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from agbcube.errors import TrainingError

pytestmark = pytest.mark.slow  # a trained run (shared with the cluster tests)

# A user's script: plain torch (or onnxruntime), agbcube unimportable.
_RUN_TORCHSCRIPT = """
import sys, json
sys.modules["agbcube"] = None  # import agbcube would fail
import numpy as np, torch
x = torch.from_numpy(np.load(sys.argv[2]))
extra = {"agbcube.json": ""}
model = torch.jit.load(sys.argv[1], _extra_files=extra)
with torch.no_grad():
    np.save(sys.argv[3], model(x).numpy())
meta = extra["agbcube.json"]
print(meta.decode() if isinstance(meta, bytes) else meta)
"""


@pytest.fixture(scope="module")
def window(cluster_reference, tmp_path_factory):
    """A window of a site, the model's input for it (NaN margin beyond the window, as the
    map's edge has), and what `predict` maps there."""
    from agbcube.cube import open_cube
    from agbcube.predict import predict_run
    from agbcube.train import load_ensemble

    cfg, run = cluster_reference
    _, spec = load_ensemble(run)
    w, m = spec["geometry"].size_px, spec["geometry"].reach_px
    site = open_cube(cfg.cube.output, "beta", chunks=None)
    ds = site.isel(y=slice(8, 8 + w), x=slice(8, 8 + w)).load()
    ds.features.values[:, 3, 5] = np.nan  # a pixel with no input at all: no value
    maps = predict_run(run, ds, window_px=w, stride_px=w, aoa=False).load()
    feats = ds.features.sel(band=spec["bands"]).values.astype("float32")
    x = np.pad(feats, ((0, 0), (m, m), (m, m)), constant_values=np.nan)[None]
    path = tmp_path_factory.mktemp("window") / "x.npy"
    np.save(path, x)
    expect = np.stack([maps.agb_mean.values, maps.agb_std.values])
    assert np.isnan(expect[:, 3, 5]).all()
    return run, path, expect, spec


def test_torchscript_export_runs_in_plain_torch_and_matches_predict(window, tmp_path):
    from agbcube.train.export import export_run, exported_metadata

    run, x_path, expect, spec = window
    model = export_run(run, tmp_path / "export")
    assert model == tmp_path / "export" / "model.pt"
    out = tmp_path / "y.npy"
    done = subprocess.run(
        [sys.executable, "-c", _RUN_TORCHSCRIPT, str(model), str(x_path), str(out)],
        capture_output=True,
        text=True,
        check=True,
    )
    meta = json.loads(done.stdout)
    assert meta["inputs"] == spec["bands"] and meta["units"] == "Mg ha-1"
    assert meta["window_px"] == spec["geometry"].size_px
    assert meta["input_px"] == spec["geometry"].window_px
    assert meta == json.loads((tmp_path / "export" / "model.json").read_text())
    assert meta == exported_metadata(model)
    with pytest.raises(
        TrainingError, match=r"run/ensemble.pt is not a model `agbcube export` wrote"
    ):
        exported_metadata(run / "ensemble.pt")  # a torch.save file, not TorchScript
    got = np.load(out)[0]
    np.testing.assert_allclose(got, expect, rtol=2e-5, atol=2e-3)  # float32 against float64
    assert np.isnan(got[:, 3, 5]).all() and np.isfinite(got).sum() == got.size - 2


def test_onnx_export_runs_in_onnxruntime_and_matches_predict(window, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    from agbcube.train.export import export_run

    run, x_path, expect, _ = window
    model = export_run(run, tmp_path / "export", fmt="onnx")
    session = ort.InferenceSession(str(model))
    (got,) = session.run(["agb"], {"features": np.load(x_path)})
    np.testing.assert_allclose(got[0], expect, rtol=2e-5, atol=2e-3)
    batch = np.repeat(np.load(x_path), 3, axis=0)  # any batch size
    assert session.run(["agb"], {"features": batch})[0].shape == (3, *expect.shape)


def test_export_refuses_a_folder_of_other_files_and_an_unknown_format(window, tmp_path):
    from agbcube.errors import ConfigError, OutputExistsError
    from agbcube.train.export import export_run

    run = window[0]
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    with pytest.raises(OutputExistsError, match="holds files agbcube did not write"):
        export_run(run, mine)
    assert [p.name for p in mine.iterdir()] == ["notes.txt"]
    with pytest.raises(ConfigError, match=r"--format: 'tflite' is not an export format"):
        export_run(run, tmp_path / "x", fmt="tflite")
