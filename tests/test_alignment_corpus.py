"""The stage-1 alignment corpus: naming rules, disjointness from evaluation classes, the build script on a tiny
extracted tree (and a tiny .deb), the folder layout it writes, and the licences that travel with a projection."""
from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess

import pytest
from fsspec.implementations.local import LocalFileSystem
from PIL import Image

from cil_platform import alignment
from cil_platform.alignment import AlignedProjection, alignment_classes, alignment_source, provenance, sidecar_path
from cil_platform.config import ExperimentConfig
from cil_platform.data.corpus import (collides, disjoint_classes, name_from_description, name_from_stem, name_key,
                                      stem_words)
from cil_platform.data.folder import class_files
from cil_platform.data.listing import list_files
from cil_platform.paths import REPO_ROOT

VOCABULARY = frozenset({"kangaroo", "light bulb", "light", "old book", "book", "star", "table tennis", "table",
                        "chimpanzee", "blue", "arrow"})


def load_script():
    spec = importlib.util.spec_from_file_location("build_alignment_corpus",
                                                  REPO_ROOT / "scripts" / "build_alignment_corpus.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_names_from_file_stems_keep_the_longest_leading_english_lemma():
    assert stem_words("star_95pt06step") == ["star", "ptstep"]
    assert name_from_stem("light_bulb_karl_bartel_01", VOCABULARY) == "light bulb"
    assert name_from_stem("star_95pt06step", VOCABULARY) == "star"
    assert name_from_stem("stara_ksiega_-_old_book_01", VOCABULARY) == "old book"  # the English side of " - "
    assert name_from_stem("arrow-down-blue_benji_pa_01", VOCABULARY) == "arrow"
    assert name_from_stem("canguro_architetto_franc_01", VOCABULARY) is None  # Italian: not a lemma
    assert name_from_stem("blue_square", VOCABULARY) is None  # a colour names no object


def test_names_from_descriptions_are_short_english_phrases():
    assert name_from_description("A chimpanzee.") == "chimpanzee"
    assert name_from_description("The red barn!") == "red barn"
    assert name_from_description("A US 25 cent piece ($.25) called a quarter.") is None  # digits, symbols, too long
    assert name_from_description("A penguin sliding on its belly.") is None
    assert name_from_description("") is None and name_from_description("Ox.") is None  # too short


def test_collisions_fold_case_articles_plurals_and_contained_words():
    reserved = {name_key(n) for n in ["apple", "school bus", "The Eiffel Tower", "flip flops"]}
    assert collides("Apples", reserved) and collides("red apple", reserved)  # plural, words containing a name
    assert collides("bus", reserved) and collides("eiffel tower", reserved)  # a name's words containing it
    assert collides("flip flop", reserved)
    assert not collides("pineapple", reserved) and not collides("bush", reserved)  # whole words only
    kept, dropped = disjoint_classes(["kangaroo", "red apple", "kangaroo", "bus"], ["apple", "school bus"])
    assert kept == ["kangaroo"] and dropped == ["bus", "red apple"]


def _png(path, colour, size=(40, 20), alpha=True):
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.new("RGBA" if alpha else "RGB", size, (*colour, 0) if alpha else colour)
    if alpha:
        image.paste((*colour, 255), (5, 5, 15, 15))
    image.save(path)


def _tree(root):
    clipart = root / "usr/share/openclipart/png"
    _png(clipart / "animals/mammals/kangaroo_jim_01.png", (200, 0, 0))
    _png(clipart / "animals/mammals/kangaroo_jim_02.png", (0, 200, 0))
    _png(clipart / "animals/mammals/kangaroo_jim_03.png", (0, 200, 0))  # the same image again
    _png(clipart / "food/fruit/apple_red_01.png", (0, 0, 200))  # QuickDraw's "apple": reserved
    _png(clipart / "food/fruit/canguro_franc_01.png", (9, 9, 9))  # no English name
    _png(clipart / "computer/icons/theme/star.png", (1, 2, 3))  # an icon theme: skipped
    (clipart / "broken").mkdir()
    (clipart / "broken/table_tennis_x.png").write_bytes(b"not a png")
    stamps = root / "usr/share/tuxpaint/stamps/animals"
    _png(stamps / "chimp.png", (50, 50, 50), alpha=False)
    (stamps / "chimp.txt").write_text("A chimpanzee.\nfr.utf8=Un chimpanzé.\n", encoding="utf-8")


def test_build_writes_a_folder_dataset_disjoint_from_reserved_names(tmp_path, monkeypatch):
    script = load_script()
    monkeypatch.setattr(script, "imagenet_lemmas", lambda: {"n1": "kangaroo", "n2": "apple", "n3": "table tennis",
                                                            "n4": "star"})
    _tree(tmp_path / "tree")
    out = tmp_path / "corpus"
    manifest = script.build(tmp_path / "tree", out, ["apple", "school bus"], max_per_class=5,
                            versions={"openclipart-png": "1:0.18"})
    fs = LocalFileSystem()
    by_class = class_files(fs, str(out), "", list_files(fs, str(out)))  # what the folder loader lists
    assert sorted(by_class) == ["chimpanzee", "kangaroo"]
    assert len(by_class["kangaroo"]) == 2 and len(by_class["chimpanzee"]) == 1  # the duplicate once
    with Image.open(out / "kangaroo" / "openclipart-png-000.png") as image:
        assert image.mode == "RGB" and image.size == (script.SIDE, script.SIDE)
        assert image.getpixel((0, 0)) == (255, 255, 255)  # transparency flattened onto white
    assert manifest["collided_classes"] == ["apple"]
    assert manifest["classes"] == 2 and manifest["images"] == 3  # "table tennis" (no decodable image) not counted
    assert manifest["counts"]["duplicate image"] == 1 and manifest["counts"]["undecodable or too large"] == 1
    assert manifest["counts"]["no usable English name"] == 1
    assert manifest["counts"]["subject without object names"] == 1
    assert json.loads((out / "corpus.json").read_text()) == manifest
    licences = {s["package"]: (s["licence"], s["version"]) for s in manifest["sources"]}
    assert licences["openclipart-png"] == ("public domain (Open Clip Art Library)", "1:0.18")
    assert licences["tuxpaint-stamps-default"][0] == "GPL-2.0"
    with pytest.raises(FileExistsError):
        script.build(tmp_path / "tree", out, [], max_per_class=5, versions={})


def test_the_per_class_cap_keeps_the_first_files(tmp_path, monkeypatch):
    script = load_script()
    monkeypatch.setattr(script, "imagenet_lemmas", lambda: {"n1": "kangaroo"})
    _tree(tmp_path / "tree")
    manifest = script.build(tmp_path / "tree", tmp_path / "corpus", [], max_per_class=1, versions={})
    assert sorted(p.name for p in (tmp_path / "corpus" / "kangaroo").iterdir()) == ["openclipart-png-000.png"]
    assert manifest["counts"]["over the per-class cap"] == 2


@pytest.mark.skipif(shutil.which("dpkg-deb") is None, reason="needs dpkg-deb")
def test_extract_unpacks_pngs_and_texts_of_a_deb_and_reads_its_version(tmp_path):
    script = load_script()
    package = tmp_path / "pkg"
    (package / "DEBIAN").mkdir(parents=True)
    (package / "DEBIAN" / "control").write_text("Package: openclipart-png\nVersion: 1:0.18-1\nArchitecture: all\n"
                                                "Maintainer: t <t@example.org>\nDescription: test\n")
    _png(package / "usr/share/openclipart/png/a/kangaroo.png", (1, 1, 1))
    (package / "usr/share/doc").mkdir(parents=True)
    (package / "usr/share/doc/README").write_text("not extracted")
    subprocess.run(["dpkg-deb", "--build", "--root-owner-group", str(package), str(tmp_path / "p.deb")], check=True,
                   capture_output=True)
    into = tmp_path / "tree"
    into.mkdir()
    assert script.extract([tmp_path / "p.deb"], into) == {"openclipart-png": "1:0.18-1"}
    assert (into / "usr/share/openclipart/png/a/kangaroo.png").is_file()
    assert not (into / "usr/share/doc/README").exists()


def test_alignment_on_a_corpus_reserves_every_name_of_the_experiments_dataset(monkeypatch):
    cfg = ExperimentConfig.model_validate({"alignment": {"dataset": {"kind": "folder", "path": "/corpus"},
                                                         "num_classes": None},
                                           "scenario": {"class_order": ["cat"], "num_classes": 1}})
    monkeypatch.setattr(alignment, "dataset_class_names", lambda config: ["kangaroo", "dog", "chimpanzee"])
    source, pool, reserved = alignment_source(cfg, ["dog", "apple"])
    assert source.dataset.path == "/corpus" and source.alignment == cfg.alignment
    assert alignment_classes(pool, cfg.alignment.num_classes, 0, reserved) == ["chimpanzee", "kangaroo"]
    default = ExperimentConfig()
    assert alignment_source(default, ["dog", "apple"]) == (default, ["dog", "apple"], set())


def test_alignment_classes_none_takes_every_class_outside_the_reserved():
    assert alignment_classes(["b", "a", "c"], None, seed=3, reserved={"c"}) == ["a", "b"]


def test_provenance_names_the_corpora_and_their_licences(tmp_path):
    (tmp_path / "corpus.json").write_text(json.dumps({"name": "clipart", "images": 3, "classes": 2, "sources": [
        {"package": "openclipart-png", "licence": "public domain"}]}))
    cfg = ExperimentConfig.model_validate({"alignment": {"dataset": {"kind": "folder", "path": str(tmp_path)}}})
    record = provenance(cfg, AlignedProjection(b"", ["a", "b"], "x"))
    assert record["corpora"] == [{"package": "openclipart-png", "licence": "public domain"}]
    assert record["classes"] == 2 and record["corpus"]["images"] == 3 and record["dataset"]["path"] == str(tmp_path)
    assert "corpora" not in provenance(ExperimentConfig(), AlignedProjection(b"", [], "x"))  # the embedded QuickDraw
    assert sidecar_path("assets/aligned/ab.safetensors") == "assets/aligned/ab.json"


def test_the_alignment_corpus_is_part_of_what_a_run_computes():
    with_corpus = ExperimentConfig.model_validate({"alignment": {"dataset": {"kind": "folder", "path": "/c"}}})
    assert with_corpus.config_hash != ExperimentConfig().config_hash


def test_zero_shot_draws_are_seeded_and_the_small_episodes_lie_inside_the_large_one():
    from jobs.zero_shot import draws

    pool = [f"c{i:03d}" for i in range(50)]
    d = draws(pool, seed=1, large=20, small=5, episodes=4)
    assert d == draws(list(reversed(pool)), seed=1, large=20, small=5, episodes=4)
    assert d != draws(pool, seed=2, large=20, small=5, episodes=4)
    flat = [c for group in d["small"] for c in group]
    assert len(d["small"]) == 4 and len(set(flat)) == 20 and set(flat) == set(d["large"][0])
    with pytest.raises(ValueError, match="pool has only 50"):
        draws(pool, seed=0, large=51, small=5, episodes=1)
