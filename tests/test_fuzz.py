"""Fuzzing the readers of what users and other runs hand agbcube: configs, folds files and a
run's files. Whatever they hold, the answer is the object or one agbcube error on one line,
quickly: never another exception, a traceback's worth of text, a hang or a memory blow-up."""

from __future__ import annotations

import json
import time

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agbcube.config import Config, load_config
from agbcube.errors import AgbcubeError

FUZZ = settings(
    max_examples=60,
    deadline=None,  # bounded below, per example, with room for a slow CI machine
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
SECONDS = 5.0

BASE = {
    "sites": [{"name": "a", "satellite": "a_sat.tif", "biomass": "a_agb.tif"}],
    "cube": {"output": "cube.zarr", "chunks": 64, "agb_range": [0, 600]},
    "chips": {"size": 16, "overlap": 0.0},
    "folds": {"n_folds": 3, "buffer_m": "auto", "output": "folds.parquet"},
    "train": {"epochs": 2, "batch_size": 8, "conv_channels": [8], "device": "cpu"},
}

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=20),
)
values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)


def _answer(read, *args):
    """``read(*args)``: its value, or the agbcube error it raised; never anything else."""
    t0 = time.perf_counter()
    try:
        value = read(*args)
    except AgbcubeError as err:
        value = err
        text = str(err)
        assert text and "\n" not in text and len(text) < 2000, text
        assert "Traceback" not in text
    assert time.perf_counter() - t0 < SECONDS
    return value


@FUZZ
@given(text=st.text(max_size=400))
def test_any_text_as_a_config_is_a_config_or_one_line(tmp_path, text):
    path = tmp_path / "cfg.yaml"
    path.write_text(text, encoding="utf-8")
    answer = _answer(load_config, path)
    assert isinstance(answer, Config | AgbcubeError)


@FUZZ
@given(data=st.data())
def test_a_config_with_any_value_anywhere_is_a_config_or_one_line(tmp_path, data):
    """A valid config with one key, at any depth, given any YAML value, or a key added."""
    raw = json.loads(json.dumps(BASE))
    section = data.draw(st.sampled_from(sorted(raw)))
    node = raw[section][0] if section == "sites" else raw[section]
    key = data.draw(st.sampled_from([*sorted(node), "extra_key"]))
    node[key] = data.draw(values)
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(raw, allow_unicode=True))
    answer = _answer(load_config, path)
    assert isinstance(answer, Config | AgbcubeError)


@pytest.mark.parametrize(
    "text",
    [
        # a "billion laughs": nine levels of nine aliases, 9**9 strings once expanded
        "\n".join(
            ["a: &a ['lol','lol','lol','lol','lol','lol','lol','lol','lol']"]
            + [
                f"{c}: &{c} [{', '.join(['*' + p] * 9)}]"
                for p, c in zip("abcdefgh", "bcdefghi", strict=True)
            ]
            + ["sites: *i"]
        ),
        "sites: " + "[" * 5000 + "]" * 5000,  # deep nesting
        "cube: {chunks: " + "9" * 100_000 + "}",  # a huge integer
        "sites:\n" + "".join(f"- {{name: s{i}, satellite: x, biomass: y}}\n" for i in range(9999)),
    ],
    ids=["aliases", "nesting", "huge-integer", "many-sites"],
)
def test_configs_built_to_exhaust_are_refused_quickly(tmp_path, text):
    path = tmp_path / "cfg.yaml"
    path.write_text(text)
    assert isinstance(_answer(load_config, path), Config | AgbcubeError)


# --------------------------------------------------------------------------------------------
# a folds file and a run's files


def _scalar_column(value, n):
    return [value] * n


@FUZZ
@given(data=st.data())
def test_any_folds_table_is_folds_or_one_line(demo_folds, tmp_path, data):
    """The demo's folds with one column dropped, replaced by one value, or one cell changed,
    or its metadata replaced: `read_folds` reads it or says what is wrong, on one line."""
    from agbcube.folds import read_folds, write_folds

    folds = demo_folds.copy()
    folds.attrs = json.loads(json.dumps(demo_folds.attrs, default=str))
    column = data.draw(st.sampled_from(sorted(c for c in folds.columns if c != "geometry")))
    how = data.draw(st.sampled_from(["drop", "fill", "cell", "meta"]))
    value = data.draw(scalars)
    if how == "drop":
        folds = folds.drop(columns=[column])
    elif how == "fill":
        folds[column] = _scalar_column(value, len(folds))
    elif how == "cell":
        row = data.draw(st.integers(0, len(folds) - 1))
        folds[column] = folds[column].astype(object)
        folds.loc[folds.index[row], column] = value
    else:
        key = data.draw(st.sampled_from(sorted(folds.attrs["agbcube"])))
        folds.attrs["agbcube"][key] = data.draw(values)
    path = tmp_path / "folds.parquet"
    try:
        write_folds(folds, path, maps=False)
    except (ValueError, TypeError, OverflowError):  # pyarrow cannot store it: nothing to read
        return
    answer = _answer(read_folds, path)
    assert answer is not None


@FUZZ
@given(blob=st.binary(max_size=2000), cut=st.floats(0, 1))
def test_any_bytes_as_a_folds_file_are_one_line(demo_folds, tmp_path, blob, cut):
    from agbcube.folds import read_folds

    path = tmp_path / "folds.parquet"
    path.write_bytes(blob)
    assert isinstance(_answer(read_folds, path), AgbcubeError)


@FUZZ
@given(
    blob=st.binary(max_size=2000),
    suffix=st.sampled_from([".gpkg", ".geojson", ".parquet", ".shp", ".csv"]),
)
def test_any_bytes_as_an_areas_file_are_one_line(tmp_path, blob, suffix):
    from agbcube.estimate import read_areas

    path = tmp_path / f"areas{suffix}"
    path.write_bytes(blob)
    assert isinstance(_answer(read_areas, path), AgbcubeError)


@FUZZ
@given(data=st.data())
def test_any_metrics_json_is_an_error_model_or_one_line(tmp_path, data):
    from agbcube.estimate import error_models

    model = dict.fromkeys(("sill", "nugget", "psill", "constant", "range_m", "beta"), 1.0)
    area = {"pooled": model, "per_site": {"a": dict(model)}}
    if data.draw(st.booleans()):  # a valid model with one value replaced
        where = data.draw(st.sampled_from([area["pooled"], area["per_site"]["a"], area]))
        where[data.draw(st.sampled_from(sorted(where)))] = data.draw(values)
        metrics = {"primary_model": "m", "intervals": {"m": {"area": area}}}
    else:
        metrics = data.draw(values)
    (tmp_path / "metrics.json").write_text(json.dumps(metrics))
    answer = _answer(error_models, tmp_path)
    assert isinstance(answer, AgbcubeError | dict)


@FUZZ
@given(data=st.data())
def test_any_run_json_is_a_plan_or_one_line(tmp_path, data):
    from agbcube.chips import ChipGeometry
    from agbcube.train.plan import RunPlan, Task

    plan = RunPlan(
        "cpu", "device", ("B4", "B8"), ChipGeometry(16, 16, 2, 2), 3, 0, 2, (Task(0, "select"),)
    ).to_dict()
    if data.draw(st.booleans()):
        plan[data.draw(st.sampled_from(sorted(plan)))] = data.draw(values)
        record = {"plan": plan}
    else:
        record = data.draw(values)
    (tmp_path / "run.json").write_text(json.dumps(record))
    answer = _answer(RunPlan.read, tmp_path)
    assert isinstance(answer, RunPlan | AgbcubeError)


@FUZZ
@given(blob=st.binary(max_size=3000), cut=st.floats(0, 1), mode=st.sampled_from(["bytes", "cut"]))
def test_any_task_result_or_model_file_is_one_line(tmp_path, blob, cut, mode):
    import numpy as np
    import torch

    from agbcube.train.modelfile import load_bundle, load_model
    from agbcube.train.tasks import load_result

    result, model = tmp_path / "member_0.npz", tmp_path / "model_0.pt"
    if mode == "bytes":
        result.write_bytes(blob)
        model.write_bytes(blob)
    else:  # a real file cut short, as a killed copy leaves it
        np.savez(result, summary=json.dumps({"seconds": 1.0}), pred=np.zeros(100))
        torch.save({"state_dict": {"w": torch.zeros(100)}, "train": {}}, model)
        for path in (result, model):
            data = path.read_bytes()
            path.write_bytes(data[: int(len(data) * cut)])
    for read, path in ((load_result, result), (load_model, model), (load_bundle, model)):
        answer = _answer(read, path)
        assert isinstance(answer, tuple | AgbcubeError) or hasattr(answer, "model")


@FUZZ
@given(record=values)
def test_any_values_saved_as_a_model_file_are_one_line(tmp_path, record):
    import torch

    from agbcube.train.modelfile import load_bundle, load_model

    path = tmp_path / "model.pt"
    torch.save(record, path)
    assert isinstance(_answer(load_model, path), AgbcubeError)
    assert isinstance(_answer(load_bundle, path), AgbcubeError)
