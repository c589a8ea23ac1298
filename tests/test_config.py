from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from agbcube.config import GridSpec, config_reference, load_config, parse_config
from agbcube.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]


def _write(tmp_path: Path, cfg: dict) -> Path:
    path = tmp_path / "cfg" / "site.yaml"
    path.parent.mkdir(exist_ok=True)
    path.write_text(yaml.safe_dump(cfg))
    return path


BASE = {"sites": [{"name": "a", "satellite": "s.tif", "biomass": "b.tif"}]}


def test_relative_paths_resolve_against_config_folder(tmp_path):
    cfg = load_config(_write(tmp_path, {**BASE, "cube": {"output": "out/c.zarr"}}))
    assert cfg.sites[0].satellite == tmp_path / "cfg" / "s.tif"
    assert cfg.cube.output == tmp_path / "cfg" / "out" / "c.zarr"
    assert cfg.folds.output == tmp_path / "cfg" / "runs" / "folds.parquet"


def test_defaults():
    cfg = parse_config(BASE)
    assert cfg.cube.grid == "biomass"
    assert cfg.cube.agb_range == (0.0, 600.0)
    assert cfg.cube.indices == "auto"
    assert (cfg.chips.size, cfg.chips.overlap) == (24, 0.1)
    assert (cfg.folds.n_folds, cfg.folds.buffer_m) == (5, "auto")


def test_unknown_key_has_did_you_mean_hint_and_path():
    raw = {"sites": [{"name": "a", "satelite": "s.tif", "biomass": "b.tif"}]}
    with pytest.raises(
        ConfigError,
        match=r"sites\.0\.satelite: unknown key 'satelite'\. "
        r"Did you mean 'satellite'\?",
    ):
        parse_config(raw)
    with pytest.raises(ConfigError, match=r"cube\.chunk: unknown key .*Did you mean 'chunks'"):
        parse_config({**BASE, "cube": {"chunk": 256}})
    with pytest.raises(ConfigError, match=r"unknown key 'fold'.*Did you mean 'folds'"):
        parse_config({**BASE, "fold": {}})


def test_wrong_types_name_the_key_path():
    with pytest.raises(ConfigError, match=r"cube\.chunks: .*integer.*'big'"):
        parse_config({**BASE, "cube": {"chunks": "big"}})
    with pytest.raises(ConfigError, match=r"folds\.n_folds"):
        parse_config({**BASE, "folds": {"n_folds": 1}})
    with pytest.raises(ConfigError, match=r"cube\.agb_range: .*low < high"):
        parse_config({**BASE, "cube": {"agb_range": [5, 1]}})
    with pytest.raises(ConfigError, match=r"sites: .*at least 1"):
        parse_config({"sites": []})


def test_context_needs_the_dense_head():
    with pytest.raises(ConfigError, match=r"train: .*context_px: 4 needs head: dense"):
        parse_config({**BASE, "train": {"context_px": 4, "head": "chip"}})
    assert parse_config({**BASE, "train": {"context_px": 4, "head": "dense"}}).train.context_px == 4
    # the baseline has no head: the setting is simply unused
    parse_config({**BASE, "train": {"context_px": 4, "head": "chip", "model": "hgb-pixel"}})


def test_grid_spec_and_bad_grid():
    cfg = parse_config({**BASE, "cube": {"grid": {"crs": "EPSG:32643", "resolution": 30}}})
    assert cfg.cube.grid == GridSpec(crs="EPSG:32643", resolution=30)
    with pytest.raises(ConfigError, match=r"cube\.grid"):
        parse_config({**BASE, "cube": {"grid": "sattelite"}})


def test_duplicate_and_bad_site_names():
    site = BASE["sites"][0]
    with pytest.raises(ConfigError, match="repeated: \\['a'\\]"):
        parse_config({"sites": [site, site]})
    with pytest.raises(ConfigError, match="site name"):
        parse_config({"sites": [{**site, "name": "a/b"}]})


def test_missing_and_non_yaml_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("sites: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    assert issubclass(ConfigError, ValueError)


@pytest.mark.parametrize(
    ("content", "match"),
    [
        (b"sites: [{name: caf\xe9}]\n", r"is not UTF-8 text \(byte 0xe9 on line 1\)"),
        (b"\n\nsites:\n  - name: \xff\xfe\n", r"is not UTF-8 text \(byte 0xff on line 4\)"),
        (b"", r"is empty"),
        (b"   \n# only a comment\n", r"is empty"),
        (b"sites: []\ndate: 2024-13-45\n", r"is not valid YAML"),
        (b"a: 1\na: [\n", r"is not valid YAML"),
        (
            b"sites: []\ntrain: {}\ntrain: {epochs: 3}\n",
            r"is not valid YAML: the key 'train' is given twice .* line 3",
        ),
        (
            b"train:\n  epochs: 3\n  epochs: 4\n",
            r"is not valid YAML: the key 'epochs' is given twice .* line 3",
        ),
    ],
)
def test_unreadable_config_files_are_one_line_errors(tmp_path, content, match):
    path = tmp_path / "cfg.yaml"
    path.write_bytes(content)
    with pytest.raises(ConfigError, match=f"config file {path} {match}") as err:
        load_config(path)
    assert "\n" not in str(err.value)


def test_a_config_folder_or_bom_file(tmp_path):
    with pytest.raises(ConfigError, match="is a folder; give the path of a YAML file"):
        load_config(tmp_path)
    path = tmp_path / "bom.yaml"
    path.write_bytes("\ufeff".encode() + yaml.safe_dump(BASE).encode())
    assert load_config(path).sites[0].name == "a"  # a byte-order mark is fine


@pytest.mark.parametrize(
    ("cfg", "key"),
    [
        ({**BASE, "sites": [{**BASE["sites"][0], "crs": "EPSG:999999"}]}, "sites.0.crs"),
        ({**BASE, "sites": [{**BASE["sites"][0], "crs": "not a crs"}]}, "sites.0.crs"),
        ({**BASE, "cube": {"grid": {"crs": "EPSG:0", "resolution": 30}}}, "cube.grid.crs"),
        ({**BASE, "cube": {"grid": {"crs": "+proj=nowhere", "resolution": 30}}}, "cube.grid.crs"),
    ],
)
def test_an_invalid_crs_names_the_key(cfg, key):
    with pytest.raises(ConfigError, match=rf"config: {key}: .* is not a CRS pyproj knows") as err:
        parse_config(cfg)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    ("pairs", "match"),
    [
        (["sat.tif"], r"raster_pairs\[0\] must be a mapping .* got 'sat.tif'"),
        ([None], r"raster_pairs\[0\] must be a mapping"),
        ([7], r"raster_pairs\[0\] must be a mapping .* got 7"),
        ([{"satellite_path": "a.tif"}], r"raster_pairs\[0\] lacks \['biomass_path'\]"),
        ([{"satellite_path": ["a"], "biomass_path": "b"}], r"\[0\]\.satellite_path must be a file"),
        ([{"satellite_path": "a", "biomass_path": 3}], r"\[0\]\.biomass_path must be a file"),
        ([{"satellite_path": "a", "biomass_path": " "}], r"\[0\]\.biomass_path must be a file"),
        (
            [{"satellite_path": "a", "biomass_path": "b", "site_name": {"x": 1}}],
            r"\[0\]\.site_name must be a name",
        ),
        ({"satellite_path": "a"}, r"raster_pairs must be a non-empty list"),
        ("a.tif", r"raster_pairs must be a non-empty list"),
        ([], r"raster_pairs must be a non-empty list"),
    ],
)
def test_original_pipeline_config_with_bad_entries(pairs, match):
    with pytest.raises(ConfigError, match=match) as err:
        parse_config({"preprocessing": {"raster_pairs": pairs}})
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    ("extra", "match"),
    [
        ({"training": [1, 2]}, r"'training' must be a mapping"),
        ({"training": {"tta_samples": "three"}}, r"training\.tta_samples must be a whole number"),
        ({"training": {"tta_samples": -1}}, r"training\.tta_samples must be a whole number"),
        ({"training": {"num_epochs": 0}}, r"train\.epochs: .*training\.num_epochs is train"),
    ],
)
def test_original_pipeline_config_with_bad_settings(extra, match):
    pairs = [{"satellite_path": "a.tif", "biomass_path": "b.tif"}]
    with pytest.raises(ConfigError, match=match):
        parse_config({"preprocessing": {"raster_pairs": pairs}, **extra})


def test_original_pipeline_layout_is_translated(tmp_path):
    legacy = {
        "preprocessing": {
            "raster_pairs": [
                {"satellite_path": "sat/x.tif", "biomass_path": "bio/x.tif", "site_name": "X"}
            ],
            "chip_size": 32,
            "overlap": 0.2,
            "min_valid_pixels": 0.6,
            "max_sat_nan_fraction": 0.25,
            "processed_dir": "data/processed",
        },
        "training": {
            "n_folds": 4,
            "spatial_buffer": 20,
            "batch_size": 32,
            "num_epochs": 150,
            "loss_function": "mse",
            "use_test_time_augmentation": True,
            "tta_samples": 3,
            "model_type": "cnn_coordinate",
            "cv_dir": "results/cv_results",
        },
    }
    with pytest.warns(UserWarning) as record:
        cfg = load_config(_write(tmp_path, legacy))
    messages = " ".join(str(w.message) for w in record)
    assert "spatial_buffer=20" in messages and "degrees" in messages
    assert "preprocessing.processed_dir" in messages
    assert cfg.sites[0].name == "X"
    assert cfg.sites[0].satellite == tmp_path / "cfg" / "sat" / "x.tif"
    assert (cfg.chips.size, cfg.chips.overlap) == (32, 0.2)
    assert (cfg.chips.min_valid_fraction, cfg.chips.max_nan_fraction) == (0.6, 0.25)
    assert cfg.folds.n_folds == 4
    assert (cfg.train.batch_size, cfg.train.epochs, cfg.train.loss) == (32, 150, "mse")
    assert cfg.train.tta and cfg.train.tta_rotations == 4
    assert "training.cv_dir" in messages


def test_original_reference_config_loads():
    ref = ROOT.parent / "shared" / "reference" / "original-pipeline_config.yaml"
    if not ref.exists():
        pytest.skip("../shared/reference is not present")
    with pytest.warns(UserWarning):
        cfg = load_config(ref)
    assert [s.name for s in cfg.sites][:2] == ["Yellapur", "Betul"]


@pytest.mark.parametrize("name", ["benchmark.yaml", "demo.yaml", "original.yaml", "fast.yaml"])
def test_shipped_configs_load(name):
    cfg = load_config(ROOT / "configs" / name)
    assert len(cfg.sites) == 3


def test_comparison_configs_share_the_benchmark_cube_and_folds():
    bench = load_config(ROOT / "configs" / "benchmark.yaml")
    for name in ("original.yaml", "fast.yaml"):
        cfg = load_config(ROOT / "configs" / name)
        assert cfg.cube == bench.cube and cfg.folds == bench.folds and cfg.chips == bench.chips
        assert cfg.train.output != bench.train.output  # never one run directory for two


def test_config_reference_lists_every_key():
    text = config_reference()
    for key in ("satellite_nodata", "agb_range", "min_valid_fraction", "buffer_m", "resolution"):
        assert f"`{key}`" in text


def test_import_is_light_and_public_api_resolves():
    import subprocess
    import sys

    code = "import sys, agbcube; assert 'torch' not in sys.modules; print(len(agbcube.__all__))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    import agbcube

    assert int(out.stdout) == len(agbcube.__all__)
    for name in agbcube.__all__:
        assert getattr(agbcube, name) is not None


def test_train_defaults_are_the_accurate_model_and_retired_keys_warn():
    from agbcube.config import TrainConfig

    t = TrainConfig()
    assert (t.head, t.norm, t.coordinates, t.log_target) == ("dense", "batch", "none", False)
    assert t.refit and t.label_buffer == "pixel" and t.val_window == 5
    assert t.context_px == len(t.conv_channels)  # 'auto': the conv stack's reach
    assert TrainConfig(head="chip").context_px == 0
    with pytest.warns(FutureWarning, match="num_workers is no longer used"):
        assert not hasattr(TrainConfig(num_workers=4), "num_workers")
