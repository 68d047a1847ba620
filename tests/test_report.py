import json
import uuid

import fsspec
import pytest
from PIL import Image

from cil_platform.report import format_table, write_report

RESULTS = {
    "title": "B0-Inc2 on toy",
    "methods": {
        "finetune": {
            "overall": [0.9, 0.5],
            "task_acc": [[0.9], [0.2, 0.8]],
            "metrics": {"average_incremental_accuracy": 0.7, "last_accuracy": 0.5,
                        "average_forgetting": 0.7, "backward_transfer": -0.7},
            "memory_bytes": None,
            "seconds": 12.345,
        },
        "replay": {
            "overall": [0.9, 0.8],
            "task_acc": [[0.9], [0.85, 0.75]],
            "metrics": {"average_incremental_accuracy": 0.85, "last_accuracy": 0.8,
                        "average_forgetting": 0.05, "backward_transfer": -0.05},
            "memory_bytes": 4096,
            "seconds": None,
        },
    },
}


def test_write_report_writes_json_and_a_valid_png(tmp_path):
    paths = write_report(str(tmp_path / "out"), RESULTS)
    assert set(paths) == {"results", "plot"}
    assert json.loads(open(paths["results"]).read()) == RESULTS
    with open(paths["plot"], "rb") as handle:
        assert handle.read(8) == b"\x89PNG\r\n\x1a\n"
    with Image.open(paths["plot"]) as image:
        image.verify()
        assert image.size[0] > 100 and image.size[1] > 100


def test_write_report_to_an_fsspec_url():
    url = f"memory://report-{uuid.uuid4().hex}"
    paths = write_report(url, RESULTS)
    assert paths["results"].startswith("memory://")
    with fsspec.open(paths["results"], "rb") as handle:
        assert json.loads(handle.read())["title"] == "B0-Inc2 on toy"
    fsspec.filesystem("memory").rm(url.removeprefix("memory://"), recursive=True)


def test_write_report_without_methods_still_plots(tmp_path):
    paths = write_report(str(tmp_path), {"methods": {}})
    with Image.open(paths["plot"]) as image:
        image.verify()


def test_format_table_rows_and_percentages():
    table = format_table(RESULTS)
    lines = table.splitlines()
    assert len(lines) == 4  # header, rule, two methods
    assert "avg inc acc %" in lines[0] and "BWT %" in lines[0]
    finetune = lines[2].split()
    replay = lines[3].split()
    assert finetune == ["finetune", "70.0", "50.0", "70.0", "-70.0", "-", "12.3"]
    assert replay == ["replay", "85.0", "80.0", "5.0", "-5.0", "4096", "-"]


def test_format_table_prints_none_metrics_as_dash():
    results = {"methods": {"one-task": {"overall": [0.8], "metrics": {
        "average_incremental_accuracy": 0.8, "last_accuracy": 0.8,
        "average_forgetting": None, "backward_transfer": None}}}}
    row = format_table(results).splitlines()[2].split()
    assert row == ["one-task", "80.0", "80.0", "-", "-", "-", "-"]


@pytest.mark.parametrize("results", [{}, {"methods": {}}])
def test_format_table_with_no_methods_is_just_the_header(results):
    assert len(format_table(results).splitlines()) == 2
