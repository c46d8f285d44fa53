"""Job specs: every shipped spec validates; errors name field, value and what is allowed."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from distributed_hte.errors import SpecError
from distributed_hte.spec import apply_overrides, load_spec, validate_spec, with_overrides

REPO = Path(__file__).resolve().parents[1]
JOBS = sorted((REPO / "jobs").glob("*.yaml"))
# The override tests need a spec with SGD training and nets.
FE_HTE_JOB = REPO / "jobs" / "fe_hte_quickstart.yaml"
MINIMAL = {"name": "t", "kind": "fe_hte", "data": {"path": "/data"}}


@pytest.mark.parametrize("path", JOBS, ids=lambda p: p.name)
def test_every_shipped_spec_validates_and_names_its_command(path):
    spec = load_spec(path)
    first = path.read_text().splitlines()[0]
    assert first.startswith("# dhte run jobs/") and first.endswith(path.name), first
    assert spec.name and spec.kind


def test_jobs_folder_is_not_empty():
    assert len(JOBS) >= 4


def test_overrides_set_nested_values_with_yaml_types():
    spec = load_spec(
        FE_HTE_JOB,
        ["train.epochs=2", "train.lr=0.5", "data.path=/some/dir", "model.beta_net.hidden=[8, 4]"],
    )
    assert spec.train.epochs == 2 and spec.train.lr == 0.5
    assert spec.data.path == "/some/dir"
    assert spec.model.beta_net.hidden == [8, 4]


@pytest.mark.parametrize(
    "override, expected",
    [
        ("train.lr=abc", "train.lr: found 'abc' (str)"),
        ("train.lrr=1", "train.lrr: unknown key; allowed keys here: amp, batch_size"),
        ("scaling.num_workers=0", "scaling.num_workers: found 0"),
        ("kind=nope", "kind: found 'nope'; allowed kinds: aipw_segments, fe_hte"),
        ("model.beta_net.hidden=[a]", "model.beta_net.hidden.0: found 'a'"),
        ("train.optimizer=lbfgs", "Input should be 'adam', 'adamw' or 'sgd'"),
        ("train.checkpoint_every=often", "checkpoint_every 'often' is neither epochs"),
        ("outputs.dir=s3://bucket/runs", "outputs.dir must be a filesystem path"),
        ("bogus=1", "bogus: unknown key"),
    ],
)
def test_errors_name_the_field_the_value_and_what_is_allowed(override, expected):
    with pytest.raises(SpecError) as err:
        load_spec(FE_HTE_JOB, [override])
    assert expected in str(err.value)


def test_yaml_syntax_error_is_a_spec_error(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nkind: fe_hte\ntrain: {epochs: 2\n")
    with pytest.raises(SpecError, match="not valid YAML"):
        load_spec(bad)


def test_missing_spec_file_and_non_mapping(tmp_path):
    with pytest.raises(SpecError, match="does not exist"):
        load_spec(tmp_path / "nope.yaml")
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    with pytest.raises(SpecError, match="must be a mapping"):
        load_spec(tmp_path / "list.yaml")


def test_data_path_or_simulate_is_required():
    with pytest.raises(SpecError, match="data.path is required"):
        validate_spec({"name": "t", "kind": "fe_hte"})


def test_duplicate_columns_are_rejected():
    raw = {**MINIMAL, "data": {"path": "/d", "beta_features": ["a", "clicks"]}}
    with pytest.raises(SpecError, match="named more than once"):
        validate_spec(raw)


def test_bad_override_syntax():
    with pytest.raises(SpecError, match="key.path=value"):
        apply_overrides({}, ["train.epochs"])
    with pytest.raises(SpecError, match="is a value"):
        apply_overrides({"train": {"epochs": 2}}, ["train.epochs.x=1"])


def test_tune_section_validation():
    raw = {**MINIMAL, "tune": {"params": {"train.lr": {"grid": [0.1], "choice": [0.2]}}}}
    with pytest.raises(SpecError, match="exactly one of"):
        validate_spec(raw)
    raw = {**MINIMAL, "tune": {"params": {"train.lr": {"grid": [0.1]}}, "search": "random"}}
    with pytest.raises(SpecError, match="use 'choice'"):
        validate_spec(raw)


def test_tune_paths_are_checked_against_the_spec():
    from distributed_hte.tune.sweep import check_params

    ok = validate_spec(
        {**MINIMAL, "tune": {"params": {"model.beta_net.dropout": {"grid": [0.0, 0.2]}}}}
    )
    check_params(ok)
    bad = validate_spec({**MINIMAL, "tune": {"params": {"train.lrate": {"grid": [0.1]}}}})
    with pytest.raises(SpecError, match="train.lrate: unknown key"):
        check_params(bad)
    bad_value = validate_spec({**MINIMAL, "tune": {"params": {"train.lr": {"grid": [-1.0]}}}})
    with pytest.raises(SpecError, match="train.lr"):
        check_params(bad_value)


def test_spec_is_frozen_and_overrides_make_copies():
    spec = validate_spec(MINIMAL)
    with pytest.raises(ValidationError, match="frozen"):
        spec.train.lr = 1.0  # type: ignore[misc]
    other = with_overrides(spec, {"train.lr": 0.5})
    assert other.train.lr == 0.5 and spec.train.lr != 0.5
