"""The Search tab: the search registry (operators from the method registry, the merging map),
the RMM form, and an RMM search in the running app: live events and plots, its recipe used on
the Recipe and Merge tabs and replayed, stop / resume, and a second page of the same browser."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from _app_helpers import EXPERTS, client, figure, poll_merge, poll_search, recipe_text, replay_scores, search_args
from app.searches import merging_map
from mergecore.errors import MergeError

pytest_plugins = ("_app_helpers",)

KEY_A = "a" * 32
KEY_B = "b" * 32


def rmm_args(fam, key, **fields):
    return search_args("rmm", fam, key, **{"episodes": 6, "data_ratio": 0.5, "update_every": 2, "rerank_top": 1,
                                           "seed": 0, **fields})


def test_search_registry_operators_and_merging_map():
    from app import searches as srch

    assert "rmm" in srch.search_names() and srch.get_search("rmm").plots
    with pytest.raises(MergeError, match="unknown search"):
        srch.get_search("nope")
    methods = srch.operator_methods(4)
    assert "ties" in methods and "slerp" not in methods and "passthrough" not in methods  # slerp: exactly 1
    assert "slerp" in srch.operator_methods(1)
    from mergecore.methods import get_method

    text = srch.add_operator(srch.get_search("rmm").field("operators").default, "dare_ties", 4)
    ops = srch.parse_operators(text, 4)
    defaults = [e["method"] for e in srch.default_operators()]  # the engine's default method, and its first
    assert [o["method"] for o in ops] == defaults + ["dare_ties"] and len(set(defaults)) == 2  # with starting values
    required = {p.name for p in get_method("dare_ties").params if p.required}
    assert required <= set(ops[2]["parameters"]) and ops[2]["parameters"] == get_method("dare_ties").starting_params()
    assert [o["name"] for o in srch.parse_operators("[ties, ties]", 2)] == ["ties", "ties_2"]
    for bad, msg in (("- {method: nope}", "unknown merge method"), ("- {method: ties, parameters: {densty: 1}}",
                     "unknown parameter"), ("- {method: slerp, parameters: {t: 0.5}}", "at most 1"),
                     ("method: ties", "YAML list"), ("- [", "line 1")):
        with pytest.raises(MergeError, match=msg):
            srch.parse_operators(bad, 4)
    z, text = srch.merging_map([[0, 1], [1, 4], [1, 0], [2, 2]], n_actions=5, n_layers=3)
    assert z[1][0] == 1 and z[4][1] == 1 and z[0][1] == 1 and z[2][2] == 1 and sum(map(sum, z)) == 4
    assert text[0][1] == "#3" and text[4][1] == "#2"


def test_rmm_form_makes_a_config(fmnist_demo):
    from app import searches as srch

    spec = srch.get_search("rmm")
    state = {"models": [{"name": n, "path": str(p)} for n, p in fmnist_demo.models.items()], "base": "base",
             "family": {"tasks": str(fmnist_demo.tasks), "val_tasks": str(fmnist_demo.val_tasks)}}
    session = srch.SearchSession.from_state(state)
    values = {f.key: srch.field_default(f, session) for f in spec.fields}
    assert values["models"] == ["fmnist_tops", "fmnist_footwear", "fmnist_other", "digits"]
    assert values["tasks"] == str(fmnist_demo.val_tasks)  # searches score on validation data
    cfg = spec.make_config(values, session)
    assert cfg.base_model == str(fmnist_demo.models["base"]) and len(cfg.models) == 4 and cfg.dar
    defaults = [e["method"] for e in srch.default_operators()]
    assert [o.method for o in cfg.operators] == defaults
    meta = spec.meta(cfg, session)
    assert meta["action_names"] == values["models"] + defaults and meta["layers"] == 2
    assert spec.load_config(json.loads(json.dumps(spec.dump_config(cfg)))) == cfg
    for change, msg in (({"models": []}, "at least one model"), ({"data_ratio": 0}, "data_ratio"),
                        ({"tasks": "/nope.yml"}, "not found"), ({"episodes": 0}, "episodes")):
        with pytest.raises(MergeError, match=msg):
            spec.make_config({**values, **change}, session)


def test_client_rmm_search_streams_events_and_its_recipe_merges(fmnist_server, fmnist_demo):
    url, ctx = fmnist_server
    c = client(url)
    c.predict(api_name="/load_demo")
    out = c.predict(**rmm_args(fmnist_demo, KEY_A), api_name="/start_search")
    assert "Started" in out[2], out[2]  # (timer, progress, status, plots ...; states and rows are not outputs)
    seen = set()  # the events arrive through the poll endpoint while the search runs
    out = poll_search(c, KEY_A, lambda d: seen.add(d["episodes"]))
    data = out[-1]
    assert data["status"] == "done", data
    assert data["episodes"] == 6 and len(seen) >= 2
    reward, timing, metrics, heatmap = (figure(p) for p in out[2:6])
    names = [t["name"] for t in reward["data"]]
    assert names == ["raw reward", "DAR reward", "best so far"] and reward["data"][0]["x"] == [1, 2, 3, 4, 5, 6]
    assert timing["data"][0]["type"] == "bar" and len(timing["data"][0]["x"]) == 6
    assert {t["name"] for t in metrics["data"]} == set(EXPERTS)
    hm = heatmap["data"][0]
    from app.searches import default_operators

    assert hm["type"] == "heatmap" and len(hm["x"]) == 2 and hm["y"] == EXPERTS + [
        e["method"] for e in default_operators()]
    assert "Best merge" in out[-5] and "merge_method: passthrough" in out[-4]["value"]
    job = ctx.jobs.find(f"browser-{KEY_A}", data["id"])
    assert (Path(job.meta["out"]) / "result.json").is_file()
    # the map, the text and the recipe show one result: the re-ranked best that recipe.yml holds
    best = job.result["best"]["emitted"]
    done = next(e.data for e in job.events if e.kind == "rmm.done")
    assert done["best_trajectory"] == best and done["scored_on"] == "all data"
    assert hm["z"] == merging_map(best, len(hm["y"]), len(hm["x"]))[0]
    assert "(all data)" in heatmap["layout"]["title"]["text"]
    assert f"{len(best)} layers: " in out[-5]

    # use the recipe: it lands in the Recipe tab's YAML and merges on the Merge tab
    out = c.predict(KEY_A, api_name="/use_search_recipe")
    assert "Loaded the best rmm recipe" in str(out[-1])
    assert "merge_method: passthrough" in recipe_text(out)
    c.predict(api_name="/merge")
    assert "Merged" in poll_merge(c)[2]

    # merge the best recipe and evaluate it on the test tasks
    scores, out = replay_scores(c, KEY_A, "rmm")
    assert "mean" in scores["headers"]
    assert "rmm-best" in out[3]["choices"][-1]  # offered on the Compare tab


def test_merging_map_shows_the_result_not_the_subset_best():
    """Once the search is done, the map shows the trajectory the rmm.done event names (the re-ranked
    best of recipe.yml and the summary), not the last episode's best on the data subsets."""
    from app.searches.rmm import RMM, best_shown

    subset_best, reranked = [[0, 0], [1, 0]], [[0, 1], [1, 2]]
    episodes = [{"kind": "rmm.episode", "data": {"episode": i, "best_reward": 90.0, "best_trajectory": subset_best}}
                for i in range(3)]
    meta = {"action_names": ["a", "b", "ties"], "layers": 2}
    heatmap = next(p for p in RMM.plots if "map" in p.title).figure
    assert best_shown(episodes)[0] == subset_best  # while it runs: the best so far
    running = heatmap(episodes, meta)
    assert [list(r) for r in running.data[0].z] == [[1, 1], [0, 0], [0, 0]] and "subsets" in running.layout.title.text
    done = episodes + [{"kind": "rmm.done", "data": {"best_reward": 80.0, "best_trajectory": reranked,
                                                      "scored_on": "all data"}}]
    fig = heatmap(done, meta)
    assert [list(r) for r in fig.data[0].z] == [[0, 0], [1, 0], [0, 1]]
    assert "reward 80.0 (all data)" in fig.layout.title.text


def test_resumed_rmm_counts_the_whole_run(fmnist_demo, tmp_path):
    """A resumed run's result (and the Search tab's summary) counts the episodes, evaluations and
    seconds of the whole run, the checkpointed part included."""
    from mergecore.events import CancelToken
    from mergecore.search.base import read_events

    from _app_helpers import demo_session
    from app import searches as srch

    spec, session = srch.get_search("rmm"), demo_session(fmnist_demo)
    values = {f.key: srch.field_default(f, session) for f in spec.fields}
    values.update(episodes=4, data_ratio=0.5, update_every=2, rerank_top=0, models=EXPERTS[:2])
    first = spec.run(spec.make_config(values, session), tmp_path, lambda ev: None, CancelToken(), False)
    events: list = []
    second = spec.run(spec.make_config({**values, "episodes": 8}, session), tmp_path, events.append, CancelToken(),
                      True)  # resumed from the checkpoint of episode 4, with four more episodes
    assert any(e.kind == "rmm.resumed" and e.data["episode"] == 4 for e in events)
    eps = {e.data["episode"]: e.data for e in read_events(tmp_path) if e.kind == "rmm.episode"}
    assert sorted(eps) == list(range(8))
    assert second["episodes"] == 8 and second["evaluations"] == eps[7]["evaluations"] > first["evaluations"]
    assert second["eval_seconds"] == pytest.approx(sum(d["eval_seconds"] for d in eps.values()))
    assert second["eval_seconds"] > first["eval_seconds"] > 0 and second["seconds"] > first["seconds"]
    text = spec.summary_md(second, {"action_names": EXPERTS[:2], "resumed": True})
    assert "8 episodes" in text and f"{second['seconds']:.1f} s in all" in text


def test_client_search_stop_resume_and_a_second_page(fmnist_server, fmnist_demo):
    url, ctx = fmnist_server
    owner = f"browser-{KEY_B}"
    c = client(url)
    c.predict(api_name="/load_demo")
    assert "nothing to resume" in c.predict(KEY_B, api_name="/resume_search")[2]
    c.predict(**rmm_args(fmnist_demo, KEY_B, episodes=400, rerank_top=1), api_name="/start_search")
    poll_search(c, KEY_B, episodes=5)
    assert "a search is already running" in c.predict(**rmm_args(fmnist_demo, KEY_B),
                                                      api_name="/start_search")[2]
    assert "Stopping" in c.predict(KEY_B, api_name="/stop_search")
    out = poll_search(c, KEY_B)
    assert out[-1]["status"] == "cancelled" and "Resume" in out[-3]
    first = ctx.jobs.jobs(owner, kind="search")[-1]
    out_dir = Path(first.meta["out"])
    assert (out_dir / "rmm_checkpoint.safetensors").is_file() and not (out_dir / "result.json").exists()
    stopped_at = len([e for e in first.events if e.kind == "rmm.episode"])

    out = c.predict(KEY_B, api_name="/resume_search")
    assert "Resuming" in out[2]
    # a second page of the same browser (same key, new session) finds the running search
    c2 = client(url)
    assert c2.predict(KEY_B, api_name="/attach_search")[0] == KEY_B
    second = ctx.jobs.jobs(owner, kind="search")[-1]
    assert second is not first and second.meta["out"] == str(out_dir) and second.meta["resumed"]
    out = poll_search(c2, KEY_B, episodes=stopped_at + 3)
    kinds = [e.kind for e in second.events]
    resumed_at = next(e.data["episode"] for e in second.events if e.kind == "rmm.resumed")
    assert resumed_at % 2 == 0 and 0 < resumed_at <= stopped_at  # the last PPO-update boundary
    replayed = [e.data["episode"] for e in second.events[:kinds.index("rmm.resumed")] if e.kind == "rmm.episode"]
    assert replayed == list(range(resumed_at))  # the plots start from episode 1, not from the checkpoint
    reward = figure(out[2])
    assert reward["data"][0]["x"][:resumed_at + 1] == list(range(1, resumed_at + 2))
    # another browser sees none of it
    other = client(url)
    other.predict("c" * 32, api_name="/attach_search")
    assert "status" not in (other.predict("c" * 32, api_name="/poll_search")[-1] or {})  # no job to show
    assert "Nothing to stop" in other.predict("c" * 32, api_name="/stop_search")
    assert ctx.jobs.jobs("browser-" + "c" * 32) == []
    c2.predict(KEY_B, api_name="/stop_search")
    assert poll_search(c2, KEY_B)[-1]["status"] == "cancelled"


def test_resume_of_a_damaged_search_state_is_one_line(tmp_path):
    from app.context import make_context
    from app.searches.runs import STATE_FILE, resumable
    from mergecore.errors import MergeError

    ctx = make_context(tmp_path / "work")
    run = ctx.workspace.searches_dir("browser-x") / "rmm-1"
    run.mkdir()
    for damage in ("{not json", '{"search": "rmm"}', '{"search": "nope", "config": {}}',
                   '{"search": "rmm", "config": {"models": 3}}'):
        (run / STATE_FILE).write_text(damage)
        with pytest.raises(MergeError) as err:
            resumable(ctx, "browser-x")
        assert "\n" not in str(err.value) and ("unreadable" in str(err.value) or "unknown" in str(err.value)), err.value
