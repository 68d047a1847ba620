"""Experiment configuration: YAML + `a.b=value` overrides, strict validation, presets, path templating."""
from __future__ import annotations

import pydantic
import pytest
import yaml

from cil_platform.config import DEFAULT_CONFIG, ExperimentConfig, apply_override, load_config
from gmm_model import PRESETS, ModelStack


def write(tmp_path, text: str, name: str = "exp.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_default_config_is_the_demo_b0_inc10(tmp_path):
    cfg = load_config()
    assert DEFAULT_CONFIG.name == "demo.yaml" and DEFAULT_CONFIG.is_file()
    assert cfg.name == "demo"
    assert cfg.scenario.num_classes == 100
    assert cfg.scenario.increment == 10
    assert cfg.scenario.initial == 0
    assert cfg.dataset.kind == "quickdraw"
    assert cfg.stack == PRESETS["offline-small"]
    # every value written in the file is the loaded value (the file is edited by others: read it)
    raw = yaml.safe_load(DEFAULT_CONFIG.read_text())
    dumped = cfg.model_dump()
    for section, values in raw.items():
        if section == "model":
            assert cfg.stack == PRESETS[values["preset"]].model_copy(update={k: v for k, v in values.items() if k != "preset"})
        elif isinstance(values, dict):
            for field, value in values.items():
                assert dumped[section][field] == value, (section, field)
        else:
            assert dumped[section] == values, section
    assert isinstance(cfg.model, ModelStack)
    # the same file by explicit path gives the same config
    assert load_config(DEFAULT_CONFIG) == cfg


def test_overrides_are_parsed_as_yaml_into_nested_sections():
    cfg = load_config(DEFAULT_CONFIG, ["train.lr=0.5", "replay.mode=exemplar", "scenario.class_order=[a, b]",
                                       "train.num_workers = 3", "name=other"])
    assert cfg.train.lr == 0.5 and isinstance(cfg.train.lr, float)
    assert cfg.replay.mode == "exemplar"
    assert cfg.scenario.class_order == ["a", "b"]
    assert cfg.train.num_workers == 3
    assert cfg.name == "other"
    assert cfg.output_dir == "runs/other"
    # untouched values of the same sections keep the file's values
    plain = load_config(DEFAULT_CONFIG)
    assert cfg.train.batch_size == plain.train.batch_size and cfg.replay.ratio == plain.replay.ratio
    assert cfg.train.epochs == plain.train.epochs and cfg.scenario.increment == plain.scenario.increment
    assert plain.train.lr != 0.5 and plain.name != "other"  # the overrides did change something


def test_override_creates_missing_sections_and_keeps_values_with_equals_sign():
    tree: dict = {"train": {"lr": 1}}
    apply_override(tree, "eval.decode=free")
    apply_override(tree, "name=a=b")
    apply_override(tree, "train.epochs=4")
    assert tree == {"train": {"lr": 1, "epochs": 4}, "eval": {"decode": "free"}, "name": "a=b"}


def test_override_into_a_scalar_is_an_error():
    with pytest.raises(ValueError, match="'name' is not a section"):
        apply_override({"name": "demo"}, "name.sub=1")


def test_malformed_override_without_equals_is_a_value_error():
    with pytest.raises(ValueError, match="key.path=value"):
        load_config(DEFAULT_CONFIG, ["train.lr"])


def test_unknown_keys_are_rejected_naming_the_key(tmp_path):
    with pytest.raises(pydantic.ValidationError, match="learning_rate"):
        load_config(DEFAULT_CONFIG, ["train.learning_rate=0.1"])
    with pytest.raises(pydantic.ValidationError, match="nonsense"):
        load_config(write(tmp_path, "name: x\nnonsense: 1\n"))
    with pytest.raises(pydantic.ValidationError, match="colour"):
        load_config(write(tmp_path, "dataset: {kind: folder, path: /x, colour: red}\n"))


def test_invalid_values_are_rejected():
    with pytest.raises(pydantic.ValidationError, match="mode"):
        load_config(DEFAULT_CONFIG, ["replay.mode=everything"])
    with pytest.raises(pydantic.ValidationError, match="increment"):
        load_config(DEFAULT_CONFIG, ["scenario.increment=0"])
    with pytest.raises(pydantic.ValidationError, match="lr"):
        load_config(DEFAULT_CONFIG, ["train.lr=0"])


def test_unknown_model_preset_is_named_in_the_error(tmp_path):
    with pytest.raises(pydantic.ValidationError, match="unknown model preset 'giant-xl'"):
        load_config(write(tmp_path, "model: giant-xl\n"))
    with pytest.raises(pydantic.ValidationError, match="offline-small"):  # the known ones are listed
        load_config(DEFAULT_CONFIG, ["model=giant-xl"])


def test_preset_mapping_overrides_fields_of_the_preset(tmp_path):
    cfg = load_config(write(tmp_path, "model: {preset: offline-small, grid: 3}\n"))
    assert cfg.stack.grid == 3
    assert cfg.stack.image_size == PRESETS["offline-small"].image_size
    assert cfg.stack.encoder == "efficientnet-lite0"
    assert cfg.stack.fingerprint != PRESETS["offline-small"].fingerprint
    assert PRESETS["offline-small"].grid == 2  # the shared preset itself is untouched
    # a mapping without `preset:` is a full stack spelled out
    full = load_config(write(tmp_path, "model: {image_size: 64}\n", "full.yaml"))
    assert full.stack == ModelStack(image_size=64)


@pytest.mark.parametrize("fields", ["grid: 100", "bogus: 1", "encoder: [1, 2]"])
def test_preset_mapping_overrides_are_validated(tmp_path, fields):
    with pytest.raises(pydantic.ValidationError):
        load_config(write(tmp_path, f"model: {{preset: offline-small, {fields}}}\n"))


def test_missing_config_file_is_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        load_config(tmp_path / "nope.yaml")


def test_empty_file_gives_all_defaults(tmp_path):
    cfg = load_config(write(tmp_path, ""))
    assert cfg == ExperimentConfig()
    assert cfg.scenario.num_classes == 100 and cfg.train.epochs == 1


def test_output_dir_templating_and_default_store_url(tmp_path):
    cfg = load_config(write(tmp_path, "name: exp7\n"))
    assert cfg.output_dir == "runs/exp7"
    assert cfg.store_url == "runs/exp7/store"

    cfg = load_config(write(tmp_path, "name: exp8\noutput_dir: /data/out/{name}-run/\n"))
    assert cfg.output_dir == "/data/out/exp8-run/"
    assert cfg.store_url == "/data/out/exp8-run/store"

    cfg = load_config(write(tmp_path, "name: exp9\nstore_url: s3://bucket/projections\n"))
    assert cfg.output_dir == "runs/exp9"
    assert cfg.store_url == "s3://bucket/projections"


def test_cache_dir_comes_from_the_environment_and_is_expanded(monkeypatch, tmp_path):
    monkeypatch.setenv("GMM_CIL_CACHE", "~/somewhere/cache")
    monkeypatch.setenv("HOME", str(tmp_path))
    cfg = load_config(write(tmp_path, "name: x\n"))
    assert cfg.cache_dir == str(tmp_path / "somewhere" / "cache")


def test_model_fields_can_be_overridden_from_the_command_line():
    cfg = load_config(None, ["model.grid=3"])
    assert cfg.stack.grid == 3
    assert cfg.stack.llm == PRESETS["offline-small"].llm
    assert cfg.stack.fingerprint != PRESETS["offline-small"].fingerprint  # a different stack, its own alignment


def test_no_credential_reaches_a_repr_or_a_written_config():
    """repr()/str() (what logs and tracebacks show) and every dump made with CREDENTIAL_FIELDS leave out the
    storage options of the run, its dataset and its alignment corpus."""
    import json

    from cil_platform.config import CREDENTIAL_FIELDS, ExperimentConfig

    cfg = ExperimentConfig(dataset={"storage_options": {"secret": "SECRET-1"}},
                           storage={"url": "s3://bucket/x", "options": {"key": "SECRET-2"}},
                           alignment={"dataset": {"kind": "folder", "path": "s3://corpus",
                                                  "storage_options": {"secret": "SECRET-3"}}})
    shown = [repr(cfg), str(cfg), repr(cfg.dataset), repr(cfg.storage), repr(cfg.alignment),
             json.dumps(cfg.model_dump(mode="json", exclude=CREDENTIAL_FIELDS))]
    assert not [text for text in shown if "SECRET" in text]
    assert cfg.dataset.storage_options == {"secret": "SECRET-1"}  # still there for the code that opens the URL


def test_the_ridge_fusion_is_reported_last_and_served_and_its_dependants_are_checked():
    cfg = load_config()  # the default: every rule, the ridge fusion served (the best GMM rule measured)
    assert [r.value for r in cfg.eval.rules] == ["trie+prior", "trie+prior+prototypes", "trie+prior+ridge"]
    assert cfg.eval.served_rule.value == "trie+prior+ridge"
    cfg = load_config(overrides=["replay.align_weight=0.5", "replay.covariance=shared"])
    assert (cfg.replay.align_weight, cfg.replay.covariance) == (0.5, "shared")
    off = load_config(overrides=["eval.fuse_ridge=false"])
    assert off.eval.served_rule.value == "trie+prior+prototypes"
    # the fusion needs the prior's generative score: without it the rule is not reported (as prototypes for free)
    assert [r.value for r in load_config(overrides=["eval.prior_correction=false"]).eval.rules] == [
        "trie", "trie+prototypes"]
    assert [r.value for r in load_config(overrides=["eval.decode=free"]).eval.rules] == ["free"]
    with pytest.raises(pydantic.ValidationError, match="align_weight needs replay.mode=pseudo and the trie\\+prior"):
        load_config(overrides=["replay.align_weight=0.5", "eval.fuse_ridge=false"])
    with pytest.raises(pydantic.ValidationError, match="align_weight needs replay.mode=pseudo"):
        load_config(overrides=["replay.align_weight=0.5", "replay.mode=exemplar"])
    with pytest.raises(pydantic.ValidationError, match="covariance=shared applies to replay.mode=pseudo"):
        load_config(overrides=["replay.covariance=shared", "replay.mode=exemplar"])
