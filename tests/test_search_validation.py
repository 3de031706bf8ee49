"""Validation discipline (issue 17): every search picks its result on the full validation split,
never returns less there than the best data-free merge it scored, keeps the final tasks out of
the choice, and resumes its choice from the checkpoint. Scores are rigged where the test needs
the search and the full split to disagree; everything else runs for real on tiny models."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
import yaml

from mergecore.events import Event
from mergecore.search.report import event_line
from mergecore.search.validation import DATA_FREE, OWN, Candidate, choose


def _recorder():
    seen: list[tuple[str, dict]] = []
    return seen, lambda kind, data: seen.append((kind, data))


def test_choose_keeps_the_search_unless_a_data_free_merge_scores_strictly_higher():
    seen, emit = _recorder()
    own = [Candidate("a", OWN, 0.6, {}, subset=0.9), Candidate("b", OWN, 0.7, {}, subset=0.8)]
    free = [Candidate("ties", DATA_FREE, 0.7, {}), Candidate("avg", DATA_FREE, 0.5, {})]
    chosen, block = choose(own + free, emit, "val.yml")
    assert chosen.label == "b" and not block["data_free"]  # the full split reorders; a tie keeps the search's
    assert [c["label"] for c in block["candidates"]] == ["a", "b", "ties", "avg"]
    assert event_line(Event(*seen[-1])).startswith("chose b: 0.7000 on the full validation split; best data-free: ties")
    chosen, block = choose(own + [Candidate("dare", DATA_FREE, 0.71, {})], emit, "val.yml")
    assert chosen.label == "dare" and block["data_free"] and block["search_best"] == {"label": "b", "mean": 0.7}
    assert "returning the data-free merge" in event_line(Event(*seen[-1]))


# ----------------------------------------------------------------------------- RMM


@pytest.fixture(scope="module")
def rmm_run(model_factory, tmp_path_factory):
    """An 8-episode RMM search over tiny Llamas (subset rewards: minus the loss on a batch)."""
    import transformers as tf

    from mergecore.search.rmm.layers import Operator
    from mergecore.search.rmm.ppo import PPOConfig
    from mergecore.search.rmm.search import RMMSearch, RMMSettings

    models = [tf.AutoModelForCausalLM.from_pretrained(model_factory("llama", i, base_seed=0 if i else None)).eval()
              for i in range(3)]
    data = [torch.randint(0, 96, (3, 12), generator=torch.Generator().manual_seed(s)) for s in range(2)]

    class Scorer:
        n_subsets = 2

        def __call__(self, model, subset):
            loss = model(data[subset], labels=data[subset], use_cache=False).loss.item()
            return -loss, {"loss": loss}

    ops = [Operator("ties", "ties", {"density": 0.5, "weight": 1.0}), Operator("avg", "linear", {"weight": 0.5})]
    out = tmp_path_factory.mktemp("rmm")
    settings = RMMSettings(episodes=8, update_every=4, keep_top=3, ppo=PPOConfig(epochs=2))
    search = RMMSearch(models[0], models[1:], ops, Scorer(), settings, out_dir=out)
    search.run()
    return search, (models, ops, Scorer, settings, out)


def test_rmm_chooses_on_the_full_split_and_falls_back_to_a_data_free_merge(rmm_run):
    from mergecore.search.rmm.run import choose_trajectory

    search, _ = rmm_run
    top = [t.emitted for t in search.top]
    uniform = [search.uniform(0), search.uniform(1)]
    assert len(top) == 3 and not any(u in top for u in uniform) and uniform[1] == [(k, 3) for k in range(4)]
    rank = {tuple(e): float(i) for i, e in enumerate(top)}  # the full split reverses the subset order
    seen, emit = _recorder()
    chosen, block = choose_trajectory(search, lambda e: (rank.get(tuple(e), -1.0), {}), emit, "val", 3)
    assert chosen.ref == top[-1] != top[0] and chosen.source == "search" and not block["data_free"]
    assert [c["label"] for c in block["candidates"]][3:] == ["ties on every layer", "avg on every layer"]
    assert [c["subset"] for c in block["candidates"][:3]] == [t.reward for t in search.top]
    assert [k for k, _ in seen] == ["search.validation"] * 5 + ["search.selected"]
    # the search's best scores below a data-free merge on the full split: the data-free one is returned
    chosen, block = choose_trajectory(search, lambda e: (5.0 if e == uniform[1] else rank.get(tuple(e), 0.0), {}),
                                      emit, "val", 3)
    assert chosen.ref == uniform[1] and chosen.source == "data-free" and block["data_free"] and seen[-1][1]["data_free"]


def test_rmm_full_split_scores_are_kept_and_resumed(rmm_run):
    from mergecore.search.rmm.search import RMMSearch

    search, (models, ops, scorer, settings, out) = rmm_run
    calls = []

    def full(model):
        calls.append(1)
        return 0.25, {"t": 0.25}

    first = search.full_score(search.uniform(0), full)
    assert first == search.full_score(search.uniform(0), full) == (0.25, {"t": 0.25}) and len(calls) == 1
    again = RMMSearch(models[0], models[1:], ops, scorer(), settings, out_dir=out)
    assert again.try_resume() and again.validated == search.validated
    assert again.full_score(search.uniform(0), full) == (0.25, {"t": 0.25}) and len(calls) == 1


# ----------------------------------------------------------------------------- evo (rigged scores)


def _evo_config(fam, tmp_path, **over):
    from mergecore.search.evo.run import load_evo_config

    cfg = {"method": "linear", "models": [str(p) for p in fam.experts.values()],
           "parameters": {"weight": {"min": 0.0, "max": 1.0}}, "tasks": str(fam.val_tasks_file),
           "data_ratio": 0.5, "popsize": 4, "max_evals": 8, "seed": 0, "batch_size": 128, **over}
    (tmp_path / "evo.yml").write_text(yaml.safe_dump(cfg))
    return load_evo_config(tmp_path / "evo.yml")


def _rig_evo(monkeypatch, start_full: float):
    """Subset score: the distance from the start; full split: minus it (the start scores `start_full`)."""
    from mergecore.search.evo.worker import EvoWorker

    calls = {"subset": 0, "full": 0}

    def rigged(self, x, cancel=None):
        d = sum((a - b) ** 2 for a, b in zip(self.genome.values(x), self.genome.values(self.genome.x0()))) ** 0.5
        full = self.evaluation.subset is None
        calls["full" if full else "subset"] += 1
        score = (start_full if d == 0 else -d) if full else d
        return {"score": score, "scores": {"rigged": score}, "seconds": 0.01, "merge_seconds": 0.0}

    monkeypatch.setattr(EvoWorker, "evaluate", rigged)
    return calls


def test_evo_returns_the_data_free_template_when_the_search_scores_below_it(tiny_fmnist_family, tmp_path,
                                                                           monkeypatch):
    from mergecore.search.evo.run import run_evo

    calls = _rig_evo(monkeypatch, start_full=0.0)
    config, root = _evo_config(tiny_fmnist_family, tmp_path)
    seen: list[Event] = []
    result = run_evo(config, root, tmp_path / "out", on_event=seen.append)
    assert result["best"]["source"] == "data-free" and result["validation"]["data_free"]
    own = [c for c in result["validation"]["candidates"] if c["source"] == "search"]
    assert result["best"]["evaluation"] is None and result["best"]["score"] == 0.0 > max(c["mean"] for c in own)
    genome = config.genome(root)
    genome.recipe(genome.x0()).save(tmp_path / "start.yml")  # weight 0.5 each: the average
    assert (tmp_path / "out" / "recipe.yml").read_text() == (tmp_path / "start.yml").read_text()
    lines = [event_line(e) for e in seen if e.kind == "search.selected"]
    assert len(lines) == 1 and "returning the data-free merge" in lines[0]
    assert calls == {"subset": 8, "full": 6}
    # the same command again resumes: every full-split score comes from the checkpoint
    run_evo(config, root, tmp_path / "out")
    assert calls == {"subset": 8, "full": 6}


def test_evo_full_split_reorders_the_subset_best(tiny_fmnist_family, tmp_path, monkeypatch):
    from mergecore.search.evo.run import run_evo

    _rig_evo(monkeypatch, start_full=-100.0)
    config, root = _evo_config(tiny_fmnist_family, tmp_path)
    result = run_evo(config, root, tmp_path / "out")
    own = [c for c in result["validation"]["candidates"] if c["source"] == "search"]
    assert len(own) == 5 and [c["subset"] for c in own] == sorted((c["subset"] for c in own), reverse=True)
    assert result["best"]["label"] == own[-1]["label"] != own[0]["label"]  # the lowest subset score of the five
    assert result["subset_best"]["evaluation"] == own[0]["evaluation"] != result["best"]["evaluation"]


# ----------------------------------------------------------------------------- DAM / AdaMerging (rigged scores)


def _dam(fam, tmp_path, name: str, **over):
    from mergecore.search.dam.run import load_dam_config, prepare_dam

    data = {"base_model": str(fam.base), "models": [str(p) for p in fam.experts.values()],
            "train_tasks": str(fam.val_tasks_file), "granularity": "layer", "form": "task_vectors",
            "loss": {"kind": "entropy"}, "steps": 6, "batch_size": 8, "examples_per_task": 16, "eval_every": 1,
            "checkpoint_every": 1, "eval_batch_size": 128, "optimizer": {"lr": 0.05}, **over}
    (tmp_path / f"{name}.yml").write_text(yaml.safe_dump(data))
    cfg, root = load_dam_config(tmp_path / f"{name}.yml")
    return prepare_dam(cfg, root, tmp_path / name)


def _rig_dam(run, periodic: dict[int, float], full: dict = None):
    """Uniform merges score by their λ, periodic evaluations by step; `full` re-scores kept states."""
    search, calls = run.search, []
    baselines = {0.3: 0.40, 0.25: 0.45, 1.0: 0.10}
    kept: dict[int, dict] = {}

    def rigged(module, is_full):
        calls.append(is_full)
        coef = next(iter(search.merger.coefs.values()))
        if search.start is None:  # the uniform merges, before training
            m = baselines[round(float(coef.flatten()[0]), 4)]
        elif full and is_full and search.step in full:
            m = next((full[s] for s, c in kept.items() if all(torch.equal(c[k], v) for k, v in
                                                                search.merger.coefs.items())), full[search.step])
        else:
            m = periodic[search.step]
            kept[search.step] = search.merger.raw_state()
        return SimpleNamespace(mean=m, scores={"rigged": m}, tasks=[SimpleNamespace(name="rigged", n=1)])

    search.evaluate_fn = rigged
    return calls, kept


def test_dam_starts_from_the_best_uniform_merge_stops_early_and_restores_the_best_state(tiny_fmnist_family,
                                                                                        tmp_path):
    from safetensors.torch import load_file

    run = _dam(tiny_fmnist_family, tmp_path, "a", patience=2)
    calls, kept = _rig_dam(run, {1: 0.5, 2: 0.6, 3: 0.55, 4: 0.58, 5: 0.9, 6: 0.9})
    seen: list[Event] = []
    run.search.on_event = seen.append
    summary = run.run()
    assert summary["start"] == "weight averaging" and summary["stopped_early"] == 4 and summary["steps"] == 4
    assert summary["best_step"] == 2 and summary["eval"]["step"] == 2 and summary["eval"]["mean"] == 0.6
    kinds = [e.kind for e in seen]
    assert kinds.count("dam.step") == 4 and "dam.stopped" in kinds and kinds.count("search.validation") == 5
    assert [e.data["label"] for e in seen if e.kind == "search.validation"] == [
        "task arithmetic (lambda 0.3)", "weight averaging", "task arithmetic (lambda 1)", "step 2 (best evaluation)",
        "step 4 (last)"]
    assert calls == [True] * 3 + [False] * 4  # uniform merges, steps 1-4; step 0 and the last were known
    coefs = load_file(str(tmp_path / "a" / "dam_coefficients.safetensors"))
    by_ckpt = {s.ckpt: s.name for s in run.search.merger.slots}
    assert all(torch.equal(coefs[c], kept[2][n]) for c, n in by_ckpt.items())  # the state of step 2
    # resumed (nothing left to do): the same choice, from the checkpoint alone
    again = _dam(tiny_fmnist_family, tmp_path, "a", patience=2)
    calls2, _ = _rig_dam(again, {})
    assert again.run()["eval"] == summary["eval"] and calls2 == []
    assert all(torch.equal(load_file(str(tmp_path / "a" / "dam_coefficients.safetensors"))[c], v)
               for c, v in coefs.items())


def test_dam_returns_the_uniform_start_when_training_scores_below_it(tiny_fmnist_family, tmp_path):
    from safetensors.torch import load_file

    run = _dam(tiny_fmnist_family, tmp_path, "a", steps=3, patience=0)
    _rig_dam(run, {1: 0.3, 2: 0.2, 3: 0.1})
    summary = run.run()
    assert summary["eval"]["source"] == "data-free" and summary["validation"]["data_free"]
    assert summary["eval"]["label"] == "weight averaging" and summary["stopped_early"] is None
    coefs = load_file(str(tmp_path / "a" / "dam_coefficients.safetensors"))
    assert all(torch.allclose(c, torch.full_like(c, 0.25)) for c in coefs.values())


def test_dam_rescores_the_subset_best_state_on_the_full_split(tiny_fmnist_family, tmp_path):
    run = _dam(tiny_fmnist_family, tmp_path, "a", steps=3, patience=0, eval_subset=0.5)
    calls, _ = _rig_dam(run, {0: 0.45, 1: 0.5, 2: 0.7, 3: 0.6}, full={2: 0.4, 3: 0.55})
    summary = run.run()
    cands = {c["label"]: c for c in summary["validation"]["candidates"]}
    assert cands["step 2 (best evaluation)"]["subset"] == 0.7 and cands["step 2 (best evaluation)"]["mean"] == 0.4
    assert summary["eval"]["label"] == "step 3 (last)" and summary["eval"]["mean"] == 0.55
    assert calls.count(True) == 3 + 2  # the uniform merges, the last state and the kept one on the full split


# ----------------------------------------------------------------------------- final tasks never choose


def _written(out) -> dict:
    """recipe.yml's text and DAM's coefficients (tensors and metadata: the file orders its metadata freely)."""
    from safetensors import safe_open

    found: dict = {"recipe": (out / "recipe.yml").read_text()}
    coefs = out / "dam_coefficients.safetensors"
    if coefs.is_file():
        with safe_open(str(coefs), "pt") as f:
            found["coefficients"] = ({k: f.get_tensor(k).tolist() for k in f.keys()}, f.metadata())
    return found


@pytest.mark.parametrize("kind", ["rmm", "evo", "dam"])
def test_the_final_tasks_never_change_the_choice(tiny_fmnist_family, tmp_path, kind):
    from mergecore.search.config import load_config
    from mergecore.search.base import run_search, search_class

    fam = tiny_fmnist_family
    models = [str(p) for p in fam.experts.values()]
    cfg = {"rmm": {"base_model": str(fam.base), "models": models, "tasks": str(fam.val_tasks_file),
                   "operators": [{"name": "avg", "method": "linear", "parameters": {"weight": 1.0}}],
                   "data_ratio": 0.25, "episodes": 4, "update_every": 4, "rerank_top": 2, "ppo": {"epochs": 1}},
           "evo": {"method": "linear", "models": models, "parameters": {"weight": {"min": 0.0, "max": 1.0}},
                   "tasks": str(fam.val_tasks_file), "data_ratio": 0.25, "popsize": 2, "max_evals": 4,
                   "batch_size": 128},
           "dam": {"base_model": str(fam.base), "models": models, "train_tasks": str(fam.val_tasks_file),
                   "steps": 2, "batch_size": 8, "examples_per_task": 16, "eval_every": 1, "eval_subset": 0.5,
                   "eval_batch_size": 128}}[kind]
    results, files = [], []
    for i, final in enumerate((fam.tasks_file, fam.val_tasks_file)):
        path = tmp_path / f"{i}.yml"
        path.write_text(yaml.safe_dump({**cfg, "final_tasks": str(final)}))
        cls = search_class(kind)
        config, root = load_config(path, cls.config_class)
        results.append(run_search(cls(config, root), tmp_path / f"out{i}"))
        files.append(_written(tmp_path / f"out{i}"))
    assert files[0] == files[1] and results[0]["validation"] == results[1]["validation"]
    assert results[0]["final"]["tasks"] != results[1]["final"]["tasks"]
    for r in results:  # the replayed checkpoint scores what the choice reported on all of the validation split
        assert r["replay"]["matches"] is True and r["replay"]["mean"] == pytest.approx(r["validation"]["mean"])
    assert json.loads(json.dumps(results[0]["validation"]))["candidates"][-1]["source"] == "data-free"
