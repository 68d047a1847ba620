"""End to end on object storage: a 2-task experiment whose dataset is parquet on S3 and whose feature cache,
Ray Train checkpoints and projection store are on S3 too (moto's server on 127.0.0.1, tests/s3.py)."""
from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cil_platform.alignment import default_aligned_path, read_aligned
from cil_platform.config import ExperimentConfig
from cil_platform.data import DatasetConfig, load_dataset
from cil_platform.experiment import run_experiment
from cil_platform.storage.store import ProjectionStore
from cil_platform.training.worker import POSITION_FILE
from gmm_model import ModelStack
from tests.test_datasets import png_bytes

pytestmark = [pytest.mark.e2e, pytest.mark.slow,  # `make test-slow`: minutes of multi-process runs each
              pytest.mark.usefixtures("ray_shut_down_after")]

TRAIN, TEST = 12, 6  # drawings per class


def quickdraw_classes(count: int) -> list[str]:
    """The first QuickDraw classes that the shipped stage-1 projection was not trained on."""
    aligned = set(read_aligned(str(default_aligned_path(ModelStack(), "")[0])).classes)
    names = load_dataset(DatasetConfig(), classes=[]).class_names
    return [name for name in names if name not in aligned][:count]


def quickdraw_as_parquet(classes: list[str], storage) -> None:
    """QuickDraw drawings of `classes` as PNG bytes with label and split columns, one parquet file per split."""
    splits = load_dataset(DatasetConfig(train_per_class=TRAIN, test_per_class=TEST), classes=classes)
    for split, images in (("train", splits.train), ("test", splits.test)):
        rows = images.dataset.take_all()
        encoded = [png_bytes(np.asarray(row["image"])) for row in rows]
        table = pa.table({"image": encoded, "label": [r["label"] for r in rows], "split": [split] * len(rows)})
        pq.write_table(table, f"{storage.path}/quickdraw/{split}.parquet", filesystem=storage.arrow)


def test_experiment_with_data_cache_checkpoints_and_store_on_s3(s3_bucket, tmp_path):
    classes = quickdraw_classes(4)
    quickdraw_as_parquet(classes, s3_bucket.storage())
    cfg = ExperimentConfig.model_validate({
        "name": "on-s3",
        "dataset": {"kind": "parquet", "path": s3_bucket.url("quickdraw"), "storage_options": s3_bucket.options},
        "scenario": {"num_classes": 4, "increment": 2, "class_order": classes},
        "train": {"num_workers": 2, "batch_size": 6, "lr": 2e-3},
        "replay": {"mode": "pseudo"},
        "eval": {"fuse_prototypes": False},
        "baselines": [],
        "output_dir": str(tmp_path / "run"),
        "storage": {"url": s3_bucket.url("gmm-cil"), "options": s3_bucket.options},
    })
    assert cfg.store_url == s3_bucket.url("gmm-cil", "on-s3", "store")
    results = run_experiment(cfg)

    gmm = results["methods"]["gmm[pseudo,trie+prior]"]
    assert [len(row) for row in gmm["task_acc"]] == [1, 2]
    assert gmm["overall"][0] > 0.5 and gmm["overall"][1] > 0.25  # chance: 1/2, then 1/4
    assert results["skipped_images"] == {}

    store = ProjectionStore(cfg.store_url, s3_bucket.options)
    assert store.versions() == [0, 1]
    manifest, weights = store.load(1)
    assert manifest.seen_classes == classes and len(weights) > 1280 * 576 * 4

    objects = s3_bucket.keys("gmm-cil")
    features = [o for o in objects if o.startswith("features/")]
    assert features and all(o.endswith(".safetensors") for o in features)  # a shard per encoder batch
    from cil_platform.feature_cache import FeatureCache
    from gmm_model import create_encoder

    cached = FeatureCache(cfg.features_url, create_encoder(cfg.stack).identity, s3_bucket.options).load_all()
    assert len(cached) == 72  # every image of the run (train and test), encoded once, in the cache on S3
    checkpoints = [o for o in objects if o.startswith("on-s3/ray_train/") and o.endswith("/projection.safetensors")]
    positions = [o for o in objects if o.startswith("on-s3/ray_train/") and o.endswith(f"/{POSITION_FILE}")]
    fs = s3_bucket.storage("gmm-cil").fs
    updates = {json.loads(fs.cat_file(f"{s3_bucket.name}/gmm-cil/{o}"))["update"] for o in positions}
    assert checkpoints and "task-001" in updates  # the session's checkpoints, each naming its update, on S3

    # the report: on the driver's disk, and beside the store on S3 (without the storage credentials)
    local = json.loads((tmp_path / "run" / "results.json").read_text())
    remote = json.loads(s3_bucket.storage("gmm-cil", "on-s3", "results.json").fs.cat_file(
        f"{s3_bucket.name}/gmm-cil/on-s3/results.json"))
    assert remote["methods"] == local["methods"] == json.loads(json.dumps(results["methods"]))
    assert "options" not in remote["config"]["storage"] and "storage_options" not in remote["config"]["dataset"]
    assert "testing" not in json.dumps(remote)
