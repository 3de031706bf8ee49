"""RMM: the layer walk, DAR, PPO, the layer bank / assembly / prefix cache, replay, resume."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from mergecore.errors import Cancelled, MergeError
from mergecore.events import CancelToken
from mergecore.search.rmm.dar import DynamicAverageReward
from mergecore.search.rmm.env import LayerWalk
from mergecore.search.rmm.ppo import PPOAgent, PPOConfig

# ----------------------------------------------------------------------------- environment


def test_walk_actions_state_and_termination():
    w = LayerWalk(n_models=2, n_ops=1, n_layers=3)
    assert (w.n_actions, w.skip, w.back, w.max_steps) == (5, 3, 4, 6)
    s = w.reset()
    assert s.shape == (3 * 3 + 4,) and s[-4] == 1  # position one-hot at layer 0
    r = w.step(1)  # layer 0 from model 1
    assert r.emitted == (0, 1) and not r.done and w.position == 1
    r = w.step(w.skip)  # skip layer 1: nothing emitted
    assert r.emitted is None and w.position == 2
    before = r.state.copy()
    r = w.step(w.back)  # back to layer 1: the state changes only in its position part
    assert w.position == 1 and not r.done
    assert np.array_equal(before[:9], r.state[:9]) and not np.array_equal(before, r.state)
    r = w.step(2)  # operator at layer 1
    assert r.emitted == (1, 2)
    r = w.step(0)
    assert r.done and not r.fell_off and w.emitted == [(0, 1), (1, 2), (2, 0)]
    assert w.merge_map[1, 0] == 1 and w.merge_map[2, 1] == 1 and w.merge_map[0, 2] == 1


def test_walk_falls_off_and_step_cap():
    w = LayerWalk(2, 0, 4, max_steps=3)
    w.reset()
    assert w.step(w.back).fell_off
    w.reset()
    w.step(0)
    w.step(w.back)
    r = w.step(w.back)
    assert r.done and r.fell_off
    w.reset()
    for _ in range(2):
        assert not w.step(0 if w.position == 0 else w.back).done
    assert w.step(0).done and w.steps == 3  # capped by max_steps
    with pytest.raises(ValueError):
        w.step(9)


# ----------------------------------------------------------------------------- DAR


def test_dar_formula_and_reset_on_cycle():
    dar = DynamicAverageReward(lam=0.8, total_episodes=10, cycle_length=3)
    assert dar(0, 50.0) == 50.0
    # e=1: w = 0.8 * 1/10 = 0.08 -> 0.08*50 + 0.92*60
    assert dar(1, 60.0) == pytest.approx(0.08 * 50 + 0.92 * 60)
    prev = 0.08 * 50 + 0.92 * 60
    assert dar(2, 40.0) == pytest.approx(0.16 * prev + 0.84 * 40)
    assert dar(3, 70.0) == 70.0  # new subset cycle: reset to the raw reward
    off = DynamicAverageReward(enabled=False, cycle_length=3)
    assert [off(e, r) for e, r in enumerate([1.0, 2.0, 3.0])] == [1.0, 2.0, 3.0]


# ----------------------------------------------------------------------------- PPO


def test_ppo_learns_a_bandit_and_is_deterministic():
    """One state, action 2 pays 1, others 0: PPO must come to prefer action 2."""

    def run(seed):
        agent = PPOAgent(4, 3, PPOConfig(epochs=10, lr_actor=3e-3), seed=seed)
        s = np.ones(4, dtype=np.float32)
        picks = []
        for ep in range(60):
            a, lp = agent.act(s)
            picks.append(a)
            agent.record(s, a, lp, 1.0 if a == 2 else 0.0, True)
            if (ep + 1) % 4 == 0:
                agent.update()
        probs = torch.softmax(agent.actor(torch.as_tensor(s)), -1)
        return picks, probs

    picks, probs = run(0)
    assert probs[2] > 0.8
    picks2, probs2 = run(0)
    assert picks == picks2 and torch.equal(probs, probs2)


def test_ppo_state_dict_round_trip():
    a = PPOAgent(5, 4, seed=1)
    b = PPOAgent(5, 4, seed=2)
    b.load_state_dict(a.state_dict())
    s = np.arange(5, dtype=np.float32)
    assert [a.act(s)[0] for _ in range(20)] == [b.act(s)[0] for _ in range(20)]


# ----------------------------------------------------------------------------- bank, assembly, replay


@pytest.fixture(scope="module")
def lm_family(model_factory):
    import transformers as tf

    paths = {"base": model_factory("llama", 0), "a": model_factory("llama", 1, base_seed=0),
             "b": model_factory("llama", 2, base_seed=0)}
    models = {k: tf.AutoModelForCausalLM.from_pretrained(v).eval() for k, v in paths.items()}
    return paths, models


def _lm_scorer(n_subsets=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    data = [torch.randint(0, 96, (3, 12), generator=g) for _ in range(n_subsets)]

    class Scorer:
        def __init__(self):
            self.n_subsets = n_subsets

        def __call__(self, model, subset):
            x = data[subset]
            loss = model(x, labels=x, use_cache=False).loss.item()
            return -loss, {"loss": loss}

    return Scorer()


OPS_SPEC = [("ties", "ties", {"density": 0.5, "weight": 1.0}), ("dare", "dare_ties", {"density": 0.6, "weight": 0.5}),
            ("avg", "linear", {"weight": 0.5})]


def _ops():
    from mergecore.search.rmm.layers import Operator

    return [Operator(n, m, dict(p)) for n, m, p in OPS_SPEC]


def test_bank_reuses_modules_and_replayed_recipe_matches(lm_family, tmp_path):
    import transformers as tf

    from mergecore.merging import merge
    from mergecore.search.rmm.layers import Assembler, LayerBank, PrefixCache
    from mergecore.search.rmm.search import trajectory_recipe

    paths, models = lm_family
    bank = LayerBank([models["a"], models["b"]], models["base"], _ops(), seed=3)
    assert bank.module(1, 0) is models["a"].model.layers[1]  # model action: the model's own layer
    assert bank.module(2, 3) is bank.module(2, 3)  # operator layers are built once
    cache = PrefixCache()
    asm = Assembler(models["base"], bank, cache)
    emitted = [(0, 2), (1, 3), (1, 1), (2, 4), (3, 0)]  # dare op, ties op, repeat a layer, linear op
    x = torch.randint(0, 96, (2, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got = asm.build(emitted)(x, use_cache=False).logits
        again = asm.build(emitted)(x, use_cache=False).logits
    assert torch.equal(got, again) and cache.hits == len(emitted)
    assert len(models["base"].model.layers) == 4 and models["base"].config.num_hidden_layers == 4

    recipe = trajectory_recipe(emitted, str(paths["base"]), [str(paths["a"]), str(paths["b"])], _ops(), seed=3)
    out = merge(recipe, tmp_path / "replay").out_dir
    replay = tf.AutoModelForCausalLM.from_pretrained(out).eval()
    assert replay.config.num_hidden_layers == 5
    with torch.no_grad():
        want = replay(x, use_cache=False).logits
    assert torch.allclose(got, want, atol=1e-5)


def test_prefix_cache_keys_batches_on_inputs_and_skips_generation(lm_family):
    """The cache names a batch by the model call's inputs: another mask or other ids miss, the
    same inputs hit; a call with a KV cache (generate) bypasses it, so generation is unchanged."""
    from mergecore.search.rmm.layers import Assembler, LayerBank, PrefixCache, input_fingerprint

    _, models = lm_family
    bank = LayerBank([models["a"], models["b"]], models["base"], _ops(), seed=3)
    cache = PrefixCache()
    emitted = [(0, 0), (1, 2), (2, 1), (3, 4)]
    cached = Assembler(models["base"], bank, cache).build(emitted)
    x = torch.randint(0, 96, (2, 10), generator=torch.Generator().manual_seed(4))
    mask = torch.ones_like(x)
    with torch.no_grad():
        first = cached(x, attention_mask=mask, use_cache=False).logits
        assert (cache.hits, cache.misses) == (0, 4) and cache.batch_key is None
        assert torch.equal(cached(x, attention_mask=mask, use_cache=False).logits, first)
        assert cache.hits == 4
        mask2 = mask.clone()
        mask2[0, :3] = 0
        cached(x, attention_mask=mask2, use_cache=False)
        assert cache.hits == 4  # another mask: another batch
        assert input_fingerprint((x,), {"m": mask}) != input_fingerprint((x,), {"m": mask2})
        assert input_fingerprint((x,), {"m": mask}) == input_fingerprint((x.clone(),), {"m": mask.clone()})
        hits = cache.hits
        plain = Assembler(models["base"], bank).build(emitted)
        want = plain.generate(x, attention_mask=mask, max_new_tokens=4, do_sample=False)
        got = cached.generate(x, attention_mask=mask, max_new_tokens=4, do_sample=False)
    assert torch.equal(got, want) and cache.hits == hits
    assert not models["base"]._forward_pre_hooks  # the hook is the candidate's, not the base's


def test_bank_replay_with_tied_embeddings(model_factory, tmp_path):
    """Qwen2 / SmolLM2-style tied lm_head: the checkpoint holds the embedding once; the bank
    still names every tensor (randomised operators are seeded by checkpoint name) and the
    replayed recipe reproduces the candidate."""
    import transformers as tf

    from mergecore.merging import merge
    from mergecore.io.names import checkpoint_names
    from mergecore.io.source import ModelSource
    from mergecore.search.rmm.layers import Assembler, LayerBank
    from mergecore.search.rmm.search import trajectory_recipe

    paths = [model_factory("qwen2", 0), model_factory("qwen2", 1, base_seed=0), model_factory("qwen2", 2, base_seed=0)]
    base, a, b = (tf.AutoModelForCausalLM.from_pretrained(p).eval() for p in paths)
    names = checkpoint_names(base, ModelSource(str(paths[0])))
    assert names["lm_head.weight"] == names["model.embed_tokens.weight"] == "model.embed_tokens.weight"
    bank = LayerBank([a, b], base, _ops(), seed=5)
    emitted = [(0, 3), (1, 2), (2, 0), (3, 3)]  # dare_ties, ties, model a, dare_ties
    x = torch.randint(0, 96, (2, 10), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        got = Assembler(base, bank).build(emitted)(x, use_cache=False).logits
    recipe = trajectory_recipe(emitted, str(paths[0]), [str(paths[1]), str(paths[2])], _ops(), seed=5)
    replay = tf.AutoModelForCausalLM.from_pretrained(merge(recipe, tmp_path / "replay").out_dir).eval()
    with torch.no_grad():
        want = replay(x, use_cache=False).logits
    assert torch.allclose(got, want, atol=1e-5)


def test_search_runs_emits_events_and_resumes(lm_family, tmp_path):
    from mergecore.search.rmm.search import RMMSearch, RMMSettings

    paths, models = lm_family
    events = []
    settings = RMMSettings(episodes=12, update_every=4, seed=0, ppo=PPOConfig(epochs=4))
    s = RMMSearch(models["base"], [models["a"], models["b"]], _ops(), _lm_scorer(), settings, out_dir=tmp_path,
                  on_event=events.append)
    res = s.run()
    eps = [e.data for e in events if e.kind == "rmm.episode"]
    assert [e["episode"] for e in eps] == list(range(12))
    assert res.best.reward == max(e["raw_reward"] for e in eps if e["raw_reward"] != settings.back_penalty)
    assert all(e["best_reward"] >= e2["best_reward"] for e, e2 in zip(eps[1:], eps) if e2["best_reward"] is not None)
    assert len((tmp_path / "rmm_log.jsonl").read_text().splitlines()) == 12

    # an uninterrupted 20-episode run equals 12 episodes + resume to 20
    full_dir = tmp_path / "full"
    full = RMMSearch(models["base"], [models["a"], models["b"]], _ops(), _lm_scorer(),
                     RMMSettings(episodes=20, update_every=4, seed=0, ppo=PPOConfig(epochs=4)), out_dir=full_dir)
    full_res = full.run()
    seen = []
    resumed = RMMSearch(models["base"], [models["a"], models["b"]], _ops(), _lm_scorer(),
                        RMMSettings(episodes=20, update_every=4, seed=0, ppo=PPOConfig(epochs=4)), out_dir=tmp_path,
                        on_event=seen.append, replay_history=True)
    assert resumed.try_resume() and resumed.episode == 12
    # the checkpointed history comes again as `replayed` events (for a plot), then `rmm.resumed`
    assert [e.kind for e in seen] == ["rmm.episode"] * 12 + ["rmm.resumed"]
    assert [e.data for e in seen[:12]] == [dict(e, replayed=True) for e in eps]
    res2 = resumed.run()
    log_full = [json.loads(line) for line in (full_dir / "rmm_log.jsonl").read_text().splitlines()]
    log_res = [json.loads(line) for line in (tmp_path / "rmm_log.jsonl").read_text().splitlines()]
    assert [e["actions"] for e in log_full] == [e["actions"] for e in log_res]
    assert res2.best.emitted == full_res.best.emitted


def test_cancel_stops_and_keeps_last_checkpoint(lm_family, tmp_path):
    from mergecore.search.rmm.search import RMMSearch, RMMSettings

    paths, models = lm_family
    cancel = CancelToken()

    def on_event(e):
        if e.kind == "rmm.episode" and e.data["episode"] == 5:
            cancel.cancel()

    s = RMMSearch(models["base"], [models["a"], models["b"]], _ops(), _lm_scorer(),
                  RMMSettings(episodes=50, update_every=4, ppo=PPOConfig(epochs=2)), out_dir=tmp_path,
                  on_event=on_event, cancel=cancel)
    with pytest.raises(Cancelled):
        s.run()
    again = RMMSearch(models["base"], [models["a"], models["b"]], _ops(), _lm_scorer(),
                      RMMSettings(episodes=50, update_every=4), out_dir=tmp_path)
    assert again.try_resume() and again.episode == 4  # the last PPO-update boundary


def test_operator_errors():
    from mergecore.search.rmm.layers import Operator
    from mergecore.search.rmm.search import trajectory_recipe

    with pytest.raises(MergeError, match="unknown parameter"):
        Operator("x", "ties", {"densty": 0.5}).resolved(2)
    with pytest.raises(MergeError, match="out of range"):
        Operator("x", "ties", {"density": 2.0, "weight": 1.0}).resolved(2)
    with pytest.raises(MergeError, match="unknown merge method"):
        Operator("x", "nope").resolved(2)
    with pytest.raises(MergeError, match="no layer"):
        trajectory_recipe([], "base", ["a"], [])


# ----------------------------------------------------------------------------- end to end on a family


def _family_config(fam, tmp_path, **extra):
    import yaml

    cfg = {
        "base_model": str(fam.base),
        "models": [str(p) for p in fam.experts.values()],
        "operators": [{"name": "avg", "method": "linear", "parameters": {"weight": 1.0}},
                      {"name": "ties", "method": "ties", "parameters": {"weight": 1.0, "density": 0.5}},
                      {"name": "dare", "method": "dare_linear", "parameters": {"weight": 1.0, "density": 0.5,
                                                                              "lambda": 0.3}}],
        "tasks": str(fam.val_tasks_file),
        "final_tasks": str(fam.tasks_file),
        "data_ratio": 0.25,
        "episodes": 8,
        "update_every": 4,
        "rerank_top": 3,
        "ppo": {"epochs": 4},
        **extra,
    }
    path = tmp_path / "rmm.yml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.mark.slow
def test_cli_search_replays_to_the_reported_score(tiny_fmnist_family, tmp_path, capsys):
    from mergecore.cli import main
    from mergecore.eval import Evaluator

    fam = tiny_fmnist_family
    cfg = _family_config(fam, tmp_path)
    out = tmp_path / "out"
    assert main(["search", "rmm", str(cfg), str(out), "--merge"]) == 0
    printed = capsys.readouterr().out
    assert "episode    8" in printed and "best reward" in printed
    result = json.loads((out / "result.json").read_text())
    assert result["episodes"] == 8 and result["best"]["scored_on"] == "all data"
    # --merge replayed the recipe into OUT/model; the program re-scored it there: the reported reward
    assert result["replay"]["model"] == str(out / "model") and result["replay"]["matches"] is True
    # the replayed checkpoint scores exactly what the search reported (val, all data) ...
    val = Evaluator(fam.val_tasks_file, processor_from=fam.base, batch_size=128).evaluate(out / "model")
    assert 100 * val.mean == pytest.approx(result["best"]["reward"], abs=1e-6)
    assert val.scores == pytest.approx(result["best"]["metrics"], abs=1e-9)
    # ... and on the final (test) tasks
    test = Evaluator(fam.tasks_file, processor_from=fam.base, batch_size=128).evaluate(out / "model")
    assert test.mean == pytest.approx(result["final"]["mean"], abs=1e-9)
    # running the same command again resumes (nothing left to do) and gives the same result
    assert main(["search", "rmm", str(cfg), str(out)]) == 0
    assert json.loads((out / "result.json").read_text())["best"] == result["best"]


def test_cli_bad_config_is_one_line(tmp_path, capsys):
    from mergecore.cli import main

    bad = tmp_path / "bad.yml"
    bad.write_text("base_model: x\nmodels: []\ntasks: t.yml\n")
    assert main(["search", "rmm", str(bad), str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "models" in err[0]
    bad.write_text("base_model: x\nmodels: [a]\ntasks: t.yml\ndata_ratio: 2\n")
    assert main(["search", "rmm", str(bad), str(tmp_path / "o")]) == 2
    assert "data_ratio" in capsys.readouterr().err
    bad.write_text("base_model: x\nmodels: [a]\ntasks: t.yml\nprefix_cache_size: lots\n")
    assert main(["search", "rmm", str(bad), str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "prefix_cache_size" in err[0] and "cannot parse size" in err[0], err


def test_config_prefix_cache_size_reaches_the_search():
    from mergecore.search.rmm.run import RMMConfig

    cfg = RMMConfig(base_model="b", models=["a"], tasks="t.yml", prefix_cache_size="4GiB")
    assert cfg.settings().cache_bytes == 4 * 2**30
    assert RMMConfig(base_model="b", models=["a"], tasks="t.yml").settings().cache_bytes == 2**30


def test_checkpoint_names_follow_transformers_renames(model_factory):
    """transformers 5 renames ViT weights on load; seeds and coefficient files use checkpoint names."""
    import transformers as tf

    from mergecore.io.names import checkpoint_names
    from mergecore.io.source import ModelSource

    path = model_factory("vit", 0)
    model = tf.ViTForImageClassification.from_pretrained(path)
    names = checkpoint_names(model, ModelSource(str(path)))
    src = ModelSource(str(path))
    assert set(names.values()) <= set(src.tensors)
    for mem, disk in names.items():
        assert torch.equal(model.state_dict()[mem], src.read(disk))
    renamed = {k: v for k, v in names.items() if k != v}
    assert renamed and any("attention.attention.query" in v for v in renamed.values())


def test_checkpoint_names_of_equal_tensors(model_factory, tmp_path):
    """Tensors equal in value (zero biases, untrained norms) in one layer still get their own
    names: matching by value alone swapped query/key biases and the two LayerNorms, which
    seeds randomised operators by the wrong name and breaks replay."""
    import transformers as tf

    from mergecore.io.names import checkpoint_names
    from mergecore.io.source import ModelSource
    from mergecore.search.dam.merger import assign_checkpoint_names, find_slots

    model = tf.ViTForImageClassification.from_pretrained(model_factory("vit", 0))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") and ".attention." in name:
                p.zero_()
    model.save_pretrained(tmp_path / "vit")
    model = tf.ViTForImageClassification.from_pretrained(tmp_path / "vit")
    src = ModelSource(str(tmp_path / "vit"))
    names = checkpoint_names(model, src)
    state = model.state_dict()
    assert torch.equal(state["vit.layers.0.attention.q_proj.bias"], state["vit.layers.0.attention.k_proj.bias"])
    assert torch.equal(state["vit.layers.0.layernorm_before.weight"], state["vit.layers.0.layernorm_after.weight"])
    expected = {"q_proj": "attention.attention.query", "k_proj": "attention.attention.key",
                "v_proj": "attention.attention.value", "layernorm_before": "layernorm_before",
                "layernorm_after": "layernorm_after"}
    checked = 0
    for mem, disk in names.items():
        for part, want in expected.items():
            if f".{part}." in mem:
                assert f".{want}." in disk, (mem, disk)
                checked += 1
    assert checked == 4 * 2 * len(expected)  # 4 layers, weight and bias each
    slots = assign_checkpoint_names(find_slots(model, granularity="layer"), model, src)
    assert all(names[s.name] == s.ckpt for s in slots)  # DAM's coefficient files use the same names
