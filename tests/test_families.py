"""Offline families: a miniature fmnist-vit build (real loaders, real training code, tiny sizes),
its layout, determinism, progress, cancel, the CLI, and the quality bench on top of it."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from mergecore.cli import main
from mergecore.errors import Cancelled, MergeError
from mergecore.eval.data import read_idx, write_idx
from mergecore.events import CancelToken
from mergecore.families import build_family, family_dir, load_family
from mergecore.families.fmnist_vit import FASHION_DEFAULT_DIR, FASHION_FILES, load_digits_28
from mergecore.io.source import ModelSource

ROOT = Path(__file__).resolve().parents[1]

from conftest import TINY  # noqa: E402  (shared with other tests)


def _cli_settings(fashion: str) -> list[str]:
    out = []
    for k, v in {**TINY, "fashion_dir": fashion}.items():
        out += ["--set", f"{k}={v}"]
    return out


@pytest.fixture(scope="module")
def tiny_family(tmp_path_factory, fashion_dir):
    """Built once through the CLI (`mergecore bench build-family fmnist-vit --quick --set ...`)."""
    root = tmp_path_factory.mktemp("families")
    rc = main(["bench", "build-family", "fmnist-vit", "--quick", "--root", str(root), "--quiet", "--json",
               *_cli_settings(fashion_dir)])
    assert rc == 0
    return load_family("fmnist-vit", root=root, quick=True)


def test_digits_loader():
    x, y = load_digits_28()
    assert x.shape == (1797, 28, 28) and x.dtype == np.uint8 and set(y) == set(range(10))
    assert x[:, :4].max() == 0 and x[:, 6:22, 6:22].max() > 200  # MNIST-like: centred, padded


def test_family_layout_and_family_json(tiny_family, fashion_dir):
    fam = tiny_family
    assert fam.root == family_dir("fmnist-vit", fam.root.parent, quick=True)
    info = fam.info
    assert info["quick"] is True and info["config"]["hidden_size"] == 16 and info["build_seconds"] > 0
    assert list(info["experts"]) == ["fmnist_tops", "fmnist_footwear", "fmnist_other", "digits"]
    shapes = None
    for path in [fam.base, *fam.experts.values()]:
        for f in ("config.json", "model.safetensors", "preprocessor_config.json"):
            assert (path / f).is_file(), path / f
        src = ModelSource(str(path), path=path)
        s = {n: t.shape for n, t in src.tensors.items()}
        assert shapes is None or s == shapes  # equal shapes: the family merges with the engine
        shapes = s
    assert shapes["classifier.weight"] == (10, 16)
    for name, e in info["experts"].items():
        assert 0.0 <= e["test_accuracy"] <= 1.0 and e["test_examples"] > 0
        assert "base_linear_probe_accuracy" in e
    # the task files load; each task uses its own expert's head; test and val data differ
    test, val = fam.tasks("test"), fam.tasks("val")
    assert [t.name for t in test] == [t.name for t in val] == list(info["experts"])
    for t in test:
        assert t.head_path() == (fam.root / f"expert_{t.name}")
    tops = test[0]
    assert tops.classes == [0, 2, 4, 6] and set(np.unique(tops.labels())) <= {0, 2, 4, 6}
    assert val[0].spec.data.range == (50000, 60000)
    labels = read_idx(Path(fashion_dir) / FASHION_FILES["test_labels"])[:200]
    assert tops.num_examples() == int(np.isin(labels, [0, 2, 4, 6]).sum())
    digits = np.load(fam.root / "data" / "digits-test-images.npy")
    assert digits.shape == (400, 28, 28)
    # the own-task accuracy in family.json is what the evaluator reports
    r = fam.evaluator("test", batch_size=64).evaluate(fam.experts["fmnist_tops"], tasks=["fmnist_tops"])
    assert r.scores["fmnist_tops"] == pytest.approx(info["experts"]["fmnist_tops"]["test_accuracy"], abs=1e-4)
    # a second build call reuses the cached family
    again = build_family("fmnist-vit", root=fam.root.parent, quick=True, overrides={**TINY, "fashion_dir": fashion_dir})
    assert again.info["built_at"] == info["built_at"]


def test_build_is_deterministic_and_reports_progress(tiny_family, fashion_dir, tmp_path):
    events = []
    fam = build_family("fmnist-vit", root=tmp_path, quick=True, overrides={**TINY, "fashion_dir": fashion_dir},
                       progress=events.append)
    for a, b in [(tiny_family.base, fam.base)] + list(zip(tiny_family.experts.values(), fam.experts.values())):
        sa, sb = ModelSource(str(a), path=a), ModelSource(str(b), path=b)
        for n in sa.tensors:
            assert torch.equal(sa.read(n), sb.read(n)), (a.name, n)
    stages = list(dict.fromkeys(e.stage for e in events))
    assert stages == ["data", "pretrain", "expert fmnist_tops", "expert fmnist_footwear", "expert fmnist_other",
                      "expert digits", "evaluate"]
    fr = [e.fraction for e in events]
    assert fr == sorted(fr) and fr[-1] == pytest.approx(1.0)
    assert any("loss" in e.metrics for e in events if e.stage == "pretrain")
    assert events[0].as_event().kind == "family.progress"


def test_cancelled_or_failed_build_leaves_nothing(fashion_dir, tmp_path):
    cancel = CancelToken()

    def stop_in_pretraining(p):
        if p.stage == "pretrain" and p.step >= 2:
            cancel.cancel()

    with pytest.raises(Cancelled):
        build_family("fmnist-vit", root=tmp_path, quick=True, overrides={**TINY, "fashion_dir": fashion_dir},
                     progress=stop_in_pretraining, cancel=cancel)
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(MergeError, match="apt-get install dataset-fashion-mnist"):
        build_family("fmnist-vit", root=tmp_path, quick=True, overrides={**TINY, "fashion_dir": str(tmp_path / "x")})
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(MergeError, match="not built"):
        load_family("fmnist-vit", root=tmp_path)


def test_cli_errors_and_listing(tiny_family, capsys):
    root = str(tiny_family.root.parent)
    assert main(["bench", "build-family", "no-such-family", "--root", root]) == 2
    assert "unknown family" in capsys.readouterr().err
    assert main(["bench", "build-family", "fmnist-vit", "--root", root, "--set", "hiden_size=3"]) == 2
    assert "unknown setting 'hiden_size'" in capsys.readouterr().err
    assert main(["bench", "build-family", "fmnist-vit", "--root", root, "--set", "expert_steps=lots"]) == 2
    assert main(["bench", "build-family", "fmnist-vit", "--quick", "--root", root]) == 0  # already built: reused
    assert "already built" in capsys.readouterr().err
    assert main(["bench", "families", "--root", root]) == 0
    assert "fmnist-vit" in capsys.readouterr().out
    # the family's tasks work with `mergecore eval`, head swapping included
    assert main(["eval", str(tiny_family.base), "--tasks", str(tiny_family.tasks_file), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert set(data["tasks"]) == set(tiny_family.experts)


def test_quality_bench_on_the_miniature_family(tiny_family):
    spec = importlib.util.spec_from_file_location("bench_quality", ROOT / "bench" / "quality.py")
    quality = importlib.util.module_from_spec(spec)
    sys.modules["bench_quality"] = quality  # dataclasses look their module up while the file runs
    spec.loader.exec_module(quality)
    df, notes = quality.run("fmnist-vit", quick=True, root=tiny_family.root.parent,
                            methods=["linear", "task_arithmetic", "ties", "no_such_method"], log=lambda *a: None)
    tasks = list(tiny_family.experts)
    assert list(df.index[:3]) == ["pretrained", "individual", "weight averaging"]
    assert "task arithmetic" in df.index
    assert list(df.columns) == tasks + ["mean", "merge_s", "eval_s", "wall_s", "how"]
    for t in tasks:  # the individual row is each expert on its own task
        assert df.loc["individual", t] == pytest.approx(tiny_family.info["experts"][t]["test_accuracy"], abs=1e-4)
    row = df.loc["weight averaging"]  # the wall time is the merge's plus the evaluation's (each rounded)
    assert row["wall_s"] == pytest.approx(row["merge_s"] + row["eval_s"], abs=0.011) and row["eval_s"] <= row["wall_s"]
    assert df.loc["weight averaging", "mean"] == pytest.approx(df.loc["weight averaging", tasks].mean())
