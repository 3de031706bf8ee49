"""DAM and the evolutionary search in the Search tab: their forms make configs (one-line errors),
their searches plot their events and leave recipes the engine replays to the scores they
reported, and they stop and resume with their history."""

from __future__ import annotations

import json
import re
from dataclasses import replace
from pathlib import Path

import pytest

from _app_helpers import (
    EXPERTS, client, demo_session, figure, poll, poll_merge, poll_search, replay_scores, saved_config,
    search_args,
)
from mergecore.errors import MergeError

pytest_plugins = ("_app_helpers",)

KEY_D = "d" * 32
KEY_E = "e" * 32
KEY_F = "f" * 32


def dam_args(fam, key, **fields):
    return search_args("dam", fam, key, **{"steps": 4, "batch_size": 8, "examples_per_task": 16, "eval_every": 2,
                                           "eval_subset": 0.5, "lr": 0.02, "lambda_l2": 0.01, "seed": 0, **fields})


def evo_args(fam, key, **fields):
    return search_args("evo", fam, key, **{"method": "task_arithmetic", "max_evals": 8, "popsize": 4,
                                           "data_ratio": 0.5, "seed": 1, **fields})


def test_dam_and_evo_forms_make_configs(fmnist_demo):
    from app import searches as srch

    assert srch.search_names() == ["rmm", "dam", "evo", "leaderboard"]
    session = demo_session(fmnist_demo)
    dam = srch.get_search("dam")
    values = {f.key: srch.field_default(f, session) for f in dam.fields}
    assert values["models"] == EXPERTS and values["tasks"] == str(fmnist_demo.val_tasks)
    cfg = dam.make_config(values, session)
    assert cfg.base_model == str(fmnist_demo.models["base"]) and cfg.train_tasks == cfg.eval_tasks == values["tasks"]
    assert [(m.model, m.task) for m in cfg.models] == [(str(fmnist_demo.models[n]), n) for n in EXPERTS]
    assert cfg.granularity == "column" and cfg.loss.kind == "kl" and cfg.eval_subset == 0.25
    # two of the four experts: each still gets its own task (by name), not the first two
    two = dam.make_config({**values, "models": ["digits", "fmnist_other"], "granularity": "layer",
                           "loss": "entropy", "eval_subset": 1.0}, session)
    assert [m.task for m in two.models] == ["digits", "fmnist_other"] and two.eval_subset is None
    assert two.granularity == "layer" and two.loss.kind == "entropy"
    meta = dam.meta(cfg, session)
    assert meta["models"] == EXPERTS and meta["steps"] == 20 and meta["base"] == "base"
    assert dam.load_config(json.loads(json.dumps(dam.dump_config(cfg)))) == cfg
    for change, msg in (({"models": []}, "at least one model"), ({"steps": 0}, "^steps: "),
                        ({"lr": 0}, "optimizer.lr"), ({"tasks": "/nope.yml"}, "not found"),
                        ({"eval_subset": 2}, "eval_subset"), ({"temperature": "hot"}, "not a number")):
        with pytest.raises(MergeError, match=msg) as err:
            dam.make_config({**values, **change}, session)
        assert "\n" not in str(err.value)

    evo = srch.get_search("evo")
    values = {f.key: srch.field_default(f, session) for f in evo.fields}
    cfg = evo.make_config(values, session)
    assert cfg.method == srch.starting_method() and cfg.backend == "local" and cfg.popsize is None
    assert cfg.parameters["weight"].init == 0.3 and len(cfg.models) == 4
    meta = evo.meta(cfg, session)
    assert meta["genes"] == 4 and meta["popsize"] == 8 and meta["expected_evals"] == 24
    assert evo.load_config(json.loads(json.dumps(evo.dump_config(cfg)))) == cfg
    # empty bounds: the method's required real parameters; filters and layer groups multiply the genes
    cfg = evo.make_config({**values, "method": "ties", "parameters": "", "filters": "attention",
                           "layer_groups": 2, "fixed": "density: 0.5", "popsize": 4}, session)
    assert list(cfg.parameters) == ["weight"] and cfg.fixed == {"density": 0.5} and cfg.popsize == 4
    assert evo.meta(cfg, session)["genes"] == 4 * 2 * 2
    for change, msg in (({"models": []}, "at least one model"), ({"parameters": "densty: [0, 1]"},
                        "not a parameter of method"), ({"parameters": "- weight"}, "YAML mapping"),
                        ({"popsize": 1}, "popsize"), ({"max_evals": 0}, "max_evals"),
                        ({"layer_groups": 5}, "exceeds the 2 layers"), ({"sigma0": 0}, "sigma0")):
        with pytest.raises(MergeError, match=msg) as err:
            evo.make_config({**values, **change}, session)
        assert "\n" not in str(err.value)


def test_client_dam_search_plots_its_loss_terms_and_its_recipe_replays(fmnist_server, fmnist_demo):
    url, ctx = fmnist_server
    c = client(url)
    c.predict(api_name="/load_demo")
    # bad input: a one-line error, nothing started
    # (0 steps never gets here: the number box's minimum refuses it; make_config's own check is tested above)
    for over, msg in (({"models": []}, "tick at least one model"), ({"lr": 0}, "optimizer.lr: ")):
        out = c.predict(**dam_args(fmnist_demo, KEY_D, **over), api_name="/start_search")
        assert out[2].startswith("**Error:**") and msg in out[2] and "\n" not in out[2], out[2]
    assert ctx.jobs.jobs(f"browser-{KEY_D}", kind="search") == []

    out = c.predict(**dam_args(fmnist_demo, KEY_D), api_name="/start_search")
    assert "Started **DAM" in out[2], out[2]
    fractions = set()
    out = poll_search(c, KEY_D, lambda d: fractions.add(d["fraction"]))
    data = out[-1]
    assert data["status"] == "done" and data["fraction"] == 1.0, data
    assert len(fractions) >= 2  # the progress moved while it ran
    loss, metrics, regs, grad = (figure(p) for p in out[2:6])
    names = [t["name"] for t in loss["data"]]
    assert names == ["total", "kl (sum over tasks)"] + [f"kl/{t}" for t in EXPERTS]
    for t in loss["data"]:
        assert t["x"] == [1, 2, 3, 4] and len(t["y"]) == 4 and all(isinstance(v, float) for v in t["y"])
    total, kl = loss["data"][0]["y"], loss["data"][1]["y"]
    assert all(a > b for a, b in zip(total, kl))  # λ2 > 0: the total adds the weighted L2 term
    assert kl[0] == pytest.approx(sum(t["y"][0] for t in loss["data"][2:]))
    assert [t["name"].split(":")[0] for t in regs["data"]] == ["cos", "l1", "l2"]
    assert all(len(t["y"]) == 4 for t in regs["data"]) and "λ 0.01" in regs["data"][2]["name"]
    assert {t["name"] for t in metrics["data"]} == set(EXPERTS) | {"mean"}
    assert metrics["data"][-1]["x"] == [0, 2, 4]  # at the start, every 2 steps, and the final one
    assert all(0 <= v <= 1 for t in metrics["data"] for v in t["y"])
    assert len(grad["data"][0]["y"]) == 4
    assert "Trained" in out[-5] and "dam_coefficients.safetensors" in out[-5]
    assert "merge_method: dam" in out[-4]["value"]
    job = ctx.jobs.find(f"browser-{KEY_D}", data["id"])
    out_dir = Path(job.meta["out"])
    assert (out_dir / "recipe.yml").is_file() and (out_dir / "dam_coefficients.safetensors").is_file()
    assert json.loads((out_dir / "app_search.json").read_text())["search"] == "dam"
    result = json.loads((out_dir / "result.json").read_text())

    # the engine replays the recipe (Merge it and evaluate: merged from its folder, scored on the test tasks)
    scores, _ = replay_scores(c, KEY_D, "dam")
    assert set(EXPERTS) <= set(scores["headers"])
    # ... and from the Recipe and Merge tabs (the coefficients file is found from there too)
    out = c.predict(KEY_D, api_name="/use_search_recipe")
    assert "Loaded the best dam recipe" in str(out[-1])
    c.predict(api_name="/merge")
    summary = poll_merge(c)[2]
    assert "Merged" in summary, summary
    from mergecore.eval import Evaluator

    merged = Path(re.search(r"written to `([^`]+)`", summary).group(1))
    r = Evaluator(fmnist_demo.val_tasks, batch_size=128).evaluate(merged)
    assert r.scores == pytest.approx(result["eval"]["scores"], abs=1e-9)  # the search's final evaluation


def test_client_evo_search_plots_candidates_and_its_recipe_replays(fmnist_server, fmnist_demo):
    url, ctx = fmnist_server
    c = client(url)
    c.predict(api_name="/load_demo")
    for over, msg in (({"models": []}, "tick at least one model"),
                      ({"parameters": "densty: [0, 1]"}, "'densty' is not a parameter of method 'task_arithmetic'"),
                      ({"method": "slerp"}, "'weight' is not a parameter of method 'slerp'")):
        out = c.predict(**evo_args(fmnist_demo, KEY_E, **over), api_name="/start_search")
        assert out[2].startswith("**Error:**") and msg in out[2] and "\n" not in out[2], out[2]

    out = c.predict(**evo_args(fmnist_demo, KEY_E), api_name="/start_search")
    assert "Started **Evolutionary" in out[2], out[2]
    out = poll_search(c, KEY_E)
    data = out[-1]
    assert data["status"] == "done" and data["fraction"] == 1.0, data
    score, metrics, population, values = (figure(p) for p in out[2:6])
    cands, best = score["data"]
    assert cands["name"] == "candidate" and cands["x"] == list(range(1, 9)) and len(cands["y"]) == 8
    assert best["y"] == [max(cands["y"][:i + 1]) for i in range(8)]
    assert {t["name"] for t in metrics["data"]} == set(EXPERTS) | {"mean (the score)"}
    assert metrics["data"][-1]["x"] == [4, 8] and metrics["data"][-1]["y"][-1] == best["y"][-1]
    assert [t["name"] for t in population["data"]] == ["max", "mean", "min"] and population["data"][0]["x"] == [1, 2]
    bar = values["data"][0]
    assert bar["type"] == "bar" and len(bar["x"]) == 4 and all(0 <= v <= 1 for v in bar["y"])
    assert "Best candidate" in out[-5] and "merge_method: task_arithmetic" in out[-4]["value"]
    job = ctx.jobs.find(f"browser-{KEY_E}", data["id"])
    out_dir = Path(job.meta["out"])
    result = json.loads((out_dir / "result.json").read_text())
    assert result["evaluations"] == 8 and result["subset_best"]["score"] == best["y"][-1]

    # the recipe replays through the engine to the score the search reported
    from mergecore.merging import merge
    from mergecore.recipe import load_recipe
    from mergecore.search.evo.worker import EvoWorker

    cfg = saved_config("evo", out_dir)
    root = Path(cfg.tasks).parent
    merged = merge(load_recipe(out_dir / "recipe.yml"), out_dir / "replayed").out_dir
    genome = cfg.genome(root)
    full = replace(cfg.eval_spec(root, genome), subset=None, subset_index=0)  # the result is chosen on all of it
    replay = EvoWorker(genome, full).evaluator.evaluate(merged)
    assert replay.mean == result["best"]["score"] and replay.scores == result["best"]["scores"]
    replay_scores(c, KEY_E, "evo")


def _wait_events(ctx, owner, kind, n):
    """The owner's latest search once it has `n` new events of `kind` (or ended)."""
    return poll(lambda: ctx.jobs.jobs(owner, kind="search")[-1],
                lambda job: job.done or len([e for e in job.events if e.kind == kind and not e.data.get("replayed")]) >= n,
                60, 0.05, f"{n} {kind} events")


def test_client_dam_and_evo_stop_and_resume_with_their_history(fmnist_server, fmnist_demo):
    url, ctx = fmnist_server
    owner = f"browser-{KEY_F}"
    c = client(url)
    c.predict(api_name="/load_demo")
    for start, kind, first_kind, count in (
            (dam_args(fmnist_demo, KEY_F, steps=400, eval_every=3), "dam.step", "dam.resumed", "step"),
            (evo_args(fmnist_demo, KEY_F, max_evals=400), "evo.generation", "evo.resumed", "generation")):
        assert "Started" in c.predict(**start, api_name="/start_search")[2]
        first = _wait_events(ctx, owner, kind, 4)
        stopping = c.predict(KEY_F, api_name="/stop_search")
        assert stopping.startswith("Stopping after the current " + ("training step" if start["name"] == "dam"
                                                                    else "evaluation")), stopping
        out = poll_search(c, KEY_F)
        assert out[-1]["status"] == "cancelled" and "Resume" in out[-3], out[-1]
        out_dir = Path(first.meta["out"])
        assert not (out_dir / "result.json").exists()
        assert saved_config(start["name"], out_dir) is not None  # what Resume starts from, after a reload too

        out = c.predict(KEY_F, api_name="/resume_search")
        assert "Resuming" in out[2], out[2]
        second = _wait_events(ctx, owner, kind, 2)
        assert second is not first and second.meta["out"] == str(out_dir)
        kinds = [e.kind for e in second.events]
        at = second.events[kinds.index(first_kind)].data[count]
        replayed = [e.data[count] for e in second.events[:kinds.index(first_kind)] if e.kind == kind]
        new = [e.data[count] for e in second.events if e.kind == kind and not e.data.get("replayed")]
        if start["name"] == "dam":  # a stop between steps keeps them all; one during an evaluation the last checkpoint
            done = max(e.data["step"] for e in first.events if e.kind == "dam.step")
            assert (at == done or at % 3 == 0) and 0 < at <= done
            assert replayed == list(range(1, at + 1)) and new[0] == at + 1
        else:  # the generation the stop cut short is redone
            assert at >= 4 and replayed == list(range(at)) and new[0] == at
        out = c.predict(KEY_F, api_name="/poll_search")
        fig = figure(out[2])
        assert fig["data"][0]["x"][:3] == [1, 2, 3]  # the plots start from the beginning, not at the checkpoint
        if start["name"] == "evo":
            assert figure(out[5])["data"][0]["type"] == "bar"  # the checkpoint's best, before any new best
        c.predict(KEY_F, api_name="/stop_search")
        assert poll_search(c, KEY_F)[-1]["status"] == "cancelled"
