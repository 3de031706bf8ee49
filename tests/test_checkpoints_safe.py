"""Search checkpoints without pickle: the safetensors + JSON format, its one-line errors, crafted
pickles that must never run, the old formats refused, and exact resume of each search."""

from __future__ import annotations

import json
import math
import pickle
import struct
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from mergecore.cli import main
from mergecore.errors import MergeError
from mergecore.search.checkpoint import (MAX_HEADER_BYTES, load_checkpoint, pack_tree, resume_file, save_checkpoint,
                                         unpack_tree)
from mergecore.search.evo.genome import Bounds, Genome
from mergecore.search.evo.search import EvoSearch, EvoSettings, checkpoint_best


class _Payload:
    """Unpickling this creates `marker`: proof that a loader ran code from the file."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _pickle_file(path: Path, marker: Path, torch_format: bool = False) -> Path:
    if torch_format:
        torch.save({"state": _Payload(marker)}, path)
    else:
        path.write_bytes(pickle.dumps({"state": _Payload(marker)}))
    return path


def _one_line(err: MergeError, path: Path) -> str:
    msg = str(err)
    assert "\n" not in msg and str(path) in msg and "--restart" in msg, msg
    return msg


# ----------------------------------------------------------------------------- the format


def test_round_trip_keeps_every_tensor_and_value_exactly(tmp_path):
    g = torch.Generator().manual_seed(3)
    tensors = {
        "w": torch.randn(3, 4, generator=g), "half": torch.randn(5, generator=g).to(torch.bfloat16),
        "step": torch.tensor(7.0), "count": torch.tensor(12, dtype=torch.int64), "mask": torch.tensor([True, False]),
        "rng": torch.get_rng_state(), "empty": torch.zeros(0, 3), "view": torch.arange(10.0)[::2],
    }
    tensors["same"] = tensors["w"]  # shared memory is written as a copy
    state = {"episode": 12, "reward": -0.1 + 0.2, "nan": float("nan"), "inf": -float("inf"), "none": None,
             "big": 2**62, "text": "héllo\n", "nested": {"a": [[1, 2], [3, 4]], "b": {"c": True}}}
    path = tmp_path / "x_checkpoint.safetensors"
    save_checkpoint(path, tensors, state, kind="rmm")
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]  # no temporary file left behind
    got, st = load_checkpoint(path, kind="rmm")
    assert set(got) == set(tensors)
    for k, t in tensors.items():
        assert got[k].dtype == t.dtype and torch.equal(got[k], t), k
    assert math.isnan(st.pop("nan")) and st.pop("inf") == -float("inf")
    assert st == {k: v for k, v in state.items() if k not in ("nan", "inf")}
    assert st["reward"] == -0.1 + 0.2  # floats survive JSON bit for bit


def test_packed_adam_state_continues_bit_for_bit(tmp_path):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
    opt = torch.optim.AdamW(net.parameters(), lr=0.01, betas=(0.8, 0.95), weight_decay=0.1)
    x = torch.randn(16, 4)

    def step(n, o):
        o.zero_grad()
        n(x).pow(2).mean().backward()
        o.step()

    for _ in range(3):
        step(net, opt)
    tensors: dict[str, torch.Tensor] = {}
    state = {"net": pack_tree(net.state_dict(), "net", tensors), "opt": pack_tree(opt.state_dict(), "opt", tensors)}
    save_checkpoint(tmp_path / "c.safetensors", tensors, state, kind="dam")
    loaded, st = load_checkpoint(tmp_path / "c.safetensors", kind="dam")
    torch.manual_seed(1)
    net2 = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
    opt2 = torch.optim.AdamW(net2.parameters(), lr=0.5)
    net2.load_state_dict(unpack_tree(st["net"], loaded))
    restored = unpack_tree(st["opt"], loaded)
    assert restored["param_groups"][0]["betas"] == (0.8, 0.95) and set(restored["state"]) == {0, 1, 2, 3}
    opt2.load_state_dict(restored)
    for _ in range(2):
        step(net, opt)
        step(net2, opt2)
    assert all(torch.equal(a, b) for a, b in zip(net.parameters(), net2.parameters()))


def _valid(tmp_path: Path, kind: str = "rmm") -> Path:
    path = tmp_path / f"{kind}_checkpoint.safetensors"
    save_checkpoint(path, {"w": torch.arange(6.0).reshape(2, 3)}, {"episode": 4}, kind=kind)
    return path


def _bad_files(tmp_path: Path) -> dict[str, tuple[bytes, str]]:
    (tmp_path / "src").mkdir()
    good = _valid(tmp_path / "src").read_bytes()
    n = struct.unpack("<Q", good[:8])[0]
    header = json.loads(good[8:8 + n])

    def with_header(h: dict, data: bytes = good[8 + n:]) -> bytes:
        raw = json.dumps(h).encode()
        return struct.pack("<Q", len(raw)) + raw + data

    wrong_state = dict(header)
    doc = b'{"format": "mergecore.search-checkpoint", "version": 1, "kind": "rmm", "state": [1'
    wrong_state["__state__"] = {"dtype": "U8", "shape": [len(doc)], "data_offsets": [0, len(doc)]}
    wrong_state["w"] = dict(header["w"], data_offsets=[len(doc), len(doc) + 24])
    negative = dict(header, w=dict(header["w"], data_offsets=[-8, 16]))
    return {
        "empty": (b"", "truncated"),
        "truncated in the header": (good[:20], "truncated"),
        "truncated in the data": (good[:-5], "truncated"),
        "garbage": (b"\x93NUMPY this is not a checkpoint" * 10, "header"),
        "huge header": (struct.pack("<Q", MAX_HEADER_BYTES + 1) + b"{}", "limit"),
        "header not JSON": (struct.pack("<Q", 6) + b"{nope}", "not valid JSON"),
        "header not UTF-8": (struct.pack("<Q", 2) + b"\xff\xfe", "not UTF-8"),
        "no metadata": (with_header({k: v for k, v in header.items() if k != "__metadata__"}), "not a mergecore"),
        "foreign kind": (with_header(dict(header, __metadata__=dict(header["__metadata__"], kind="dam"))),
                         "of kind 'dam', not 'rmm'"),
        "future version": (with_header(dict(header, __metadata__=dict(header["__metadata__"], version="9"))),
                           "version"),
        "negative offsets": (with_header(negative), "data offsets"),
        "state not JSON": (with_header(wrong_state, doc + struct.pack("<6f", *range(6))), "not valid JSON"),
        "unknown dtype": (with_header(dict(header, w=dict(header["w"], dtype="X9"))), "unknown dtype"),
        "shape too big for its bytes": (with_header(dict(header, w=dict(header["w"], shape=[4, 4]))),
                                        "does not match"),
    }


def test_every_bad_file_is_one_line_naming_it_and_restart(tmp_path):
    for name, (data, reason) in _bad_files(tmp_path).items():
        path = tmp_path / "rmm_checkpoint.safetensors"
        path.write_bytes(data)
        with pytest.raises(MergeError) as e:
            load_checkpoint(path, kind="rmm")
        msg = _one_line(e.value, path)
        assert reason in msg, (name, msg)
    # a folder in its place, and a valid checkpoint of another search
    (tmp_path / "dir").mkdir()
    (tmp_path / "dir" / "rmm_checkpoint.safetensors").mkdir()
    with pytest.raises(MergeError, match="not a regular file"):
        load_checkpoint(tmp_path / "dir" / "rmm_checkpoint.safetensors", kind="rmm")
    with pytest.raises(MergeError, match="of kind 'evo', not 'dam'"):
        load_checkpoint(_valid(tmp_path, "evo"), kind="dam")


def test_crafted_pickles_never_run(tmp_path):
    marker = tmp_path / "pwned"
    for legacy, new in [("rmm_checkpoint.pt", "rmm_checkpoint.safetensors"),
                        ("dam_checkpoint.pt", "dam_checkpoint.safetensors"),
                        ("evo_checkpoint.pkl", "evo_checkpoint.safetensors")]:
        kind = new.split("_")[0]
        for torch_format in (False, True):
            d = tmp_path / f"{kind}{int(torch_format)}"
            d.mkdir()
            old = _pickle_file(d / legacy, marker, torch_format)
            with pytest.raises(MergeError, match="old unsafe .pickle. format") as e:
                resume_file(d / new, old)
            _one_line(e.value, old)
            assert old.is_file()  # left in place
            path = _pickle_file(d / new, marker, torch_format)
            assert resume_file(path, old)  # the new name is what gets read ...
            with pytest.raises(MergeError) as e:  # ... and it is no safetensors file
                load_checkpoint(path, kind=kind)
            _one_line(e.value, path)
    assert not marker.exists()


# ----------------------------------------------------------------------------- evo: exact resume


class _Backend:
    """Scores a genome by a fixed smooth function (with ties, as accuracies have); no models."""

    workers = 1

    def map(self, items, cancel=None):
        out = []
        for g in items:
            s = round(-sum((x - t) ** 2 for x, t in zip(g, (0.2, 0.9, 0.4, 0.7))), 3)
            out.append({"score": s, "scores": {"t": s}, "seconds": 0.0})
        return out

    def close(self):
        pass


GENOME = Genome(method="linear", models=("a", "b"), parameters=(("weight", Bounds(0.0, 1.0)),), filters=("attn",))


def _evo(out_dir, max_evals, events=None, **kw):
    return EvoSearch(GENOME, _Backend(), EvoSettings(popsize=4, max_evals=max_evals, seed=3, **kw), out_dir=out_dir,
                     on_event=events.append if events is not None else None)


def _candidates(events):
    return [(e.data["generation"], e.data["genome"], e.data["score"]) for e in events if e.kind == "evo.candidate"]


def test_evo_resume_gives_bit_identical_candidates(tmp_path):
    full_events: list = []
    full = _evo(tmp_path / "full", 32, full_events)
    full.run()
    # stopped after 2 generations, resumed to 5, resumed again to 8: the same candidates, bit for bit
    _evo(tmp_path / "b", 8).run()
    seen = _candidates([e for e in full_events if e.kind == "evo.candidate" and e.data["generation"] < 2])
    for budget in (20, 32):
        events: list = []
        s = _evo(tmp_path / "b", budget, events)
        assert s.try_resume()
        s.run()
        seen += _candidates(events)
    assert seen == _candidates(full_events)
    assert (tmp_path / "b" / "evo_checkpoint.safetensors").is_file()
    assert not (tmp_path / "b" / "evo_checkpoint.pkl").exists()
    # the optimiser and its RNG end where the uninterrupted run's did
    assert np.array_equal(s.es.mean, full.es.mean) and s.es.sigma == full.es.sigma
    assert np.array_equal(s.es.C, full.es.C)
    assert all(np.array_equal(a, b) if isinstance(a, np.ndarray) else a == b
               for a, b in zip(s.rng_state, full.rng_state))
    assert checkpoint_best(tmp_path / "b").genome == full.best.genome


def test_evo_refuses_tampered_pickled_and_old_checkpoints(tmp_path):
    out = tmp_path / "o"
    _evo(out, 12).run()
    path = out / "evo_checkpoint.safetensors"
    tensors, state = load_checkpoint(path, kind="evo")
    state["generations"][1]["solutions"][0][0] += 1e-12  # no longer what CMA-ES asks for
    save_checkpoint(path, tensors, state, kind="evo")
    with pytest.raises(MergeError, match="generation 1 does not replay") as e:
        _evo(out, 16).try_resume()
    _one_line(e.value, path)
    del state["history"]
    save_checkpoint(path, tensors, state, kind="evo")
    with pytest.raises(MergeError, match="no entry 'history'"):
        _evo(out, 16).try_resume()
    state["history"] = "not a list"
    save_checkpoint(path, tensors, state, kind="evo")
    with pytest.raises(MergeError, match="'history' is a str"):
        _evo(out, 16).try_resume()
    # another search's checkpoint under this name
    save_checkpoint(path, {}, {"episode": 1}, kind="rmm")
    with pytest.raises(MergeError, match="of kind 'rmm', not 'evo'"):
        _evo(out, 16).try_resume()
    marker = tmp_path / "pwned"
    _pickle_file(path, marker)
    with pytest.raises(MergeError):
        _evo(out, 16).try_resume()
    with pytest.raises(MergeError):
        checkpoint_best(out)
    path.unlink()
    _pickle_file(out / "evo_checkpoint.pkl", marker)
    with pytest.raises(MergeError, match="old unsafe"):
        _evo(out, 16).try_resume()
    assert not marker.exists() and (out / "evo_checkpoint.pkl").is_file()
    # --restart (no resume) runs, and afterwards the new checkpoint is what resumes
    _evo(out, 4).run()
    assert _evo(out, 8).try_resume()


# ----------------------------------------------------------------------------- rmm: exact restore


def test_rmm_restores_agent_memo_and_top_exactly_and_refuses_bad_files(model_factory, tmp_path):
    import transformers as tf

    from mergecore.search.rmm.layers import Operator
    from mergecore.search.rmm.ppo import PPOConfig
    from mergecore.search.rmm.search import RMMSearch, RMMSettings

    paths = [model_factory("llama", 0), model_factory("llama", 1, base_seed=0), model_factory("llama", 2, base_seed=0)]
    base, a, b = (tf.AutoModelForCausalLM.from_pretrained(p).eval() for p in paths)
    data = [torch.randint(0, 96, (2, 8), generator=torch.Generator().manual_seed(i)) for i in range(2)]

    class Scorer:
        n_subsets = 2

        def __call__(self, model, subset):
            loss = model(data[subset], labels=data[subset], use_cache=False).loss.item()
            return -loss, {"loss": loss}

    def search(out):
        return RMMSearch(base, [a, b], [Operator("avg", "linear", {"weight": 0.5})], Scorer(),
                         RMMSettings(episodes=8, update_every=4, seed=1, ppo=PPOConfig(epochs=2)), out_dir=out)

    out = tmp_path / "rmm"
    s = search(out)
    s.run()
    r = search(out)
    assert r.try_resume() and r.episode == 8 and r.evaluations == s.evaluations
    assert r.memo and r.memo == s.memo  # keys are (tuple of (layer, action) tuples, subset) again
    assert all(type(k[0]) is tuple and all(type(x) is tuple for x in k[0]) for k in r.memo)
    assert [t.__dict__ for t in r.top] == [t.__dict__ for t in s.top] and r.history == s.history
    assert r.dar.last == s.dar.last
    for k, v in s.agent.state_dict().items():
        if k == "optimizer":
            continue
        mine = r.agent.state_dict()[k]
        assert (torch.equal(mine, v) if isinstance(v, torch.Tensor)
                else all(torch.equal(mine[n], t) for n, t in v.items())), k
    o1, o2 = s.agent.optimizer.state_dict(), r.agent.optimizer.state_dict()
    assert o1["param_groups"] == o2["param_groups"]
    assert all(torch.equal(o1["state"][i][n], o2["state"][i][n]) for i in o1["state"] for n in o1["state"][i])

    path = out / "rmm_checkpoint.safetensors"
    tensors, state = load_checkpoint(path, kind="rmm")
    state["memo"] = [["not", "an", "entry", 1]]
    save_checkpoint(path, tensors, state, kind="rmm")
    with pytest.raises(MergeError, match="memo entry") as e:
        search(out).try_resume()
    _one_line(e.value, path)
    save_checkpoint(path, {k: v for k, v in tensors.items() if not k.startswith("agent.actor")},
                    dict(state, memo=[]), kind="rmm")
    with pytest.raises(MergeError, match="no entry") as e:
        search(out).try_resume()
    _one_line(e.value, path)
    marker = tmp_path / "pwned"
    _pickle_file(path, marker, torch_format=True)
    with pytest.raises(MergeError):
        search(out).try_resume()
    path.unlink()
    _pickle_file(out / "rmm_checkpoint.pt", marker, torch_format=True)
    with pytest.raises(MergeError, match="old unsafe") as e:
        search(out).try_resume()
    _one_line(e.value, out / "rmm_checkpoint.pt")
    assert not marker.exists()


# ----------------------------------------------------------------------------- through the CLI


def _error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = [x for x in err.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), err
    return lines[0]


def _configs(fam, tmp_path: Path) -> dict[str, Path]:
    models = [str(p) for p in fam.experts.values()]
    cfgs = {
        "rmm": {"base_model": str(fam.base), "models": models, "tasks": str(fam.val_tasks_file),
                "operators": [{"name": "avg", "method": "linear", "parameters": {"weight": 1.0}}],
                "data_ratio": 0.25, "episodes": 4, "update_every": 4, "rerank_top": 1, "ppo": {"epochs": 1}},
        "dam": {"base_model": str(fam.base), "models": models, "train_tasks": str(fam.val_tasks_file),
                "eval_tasks": str(fam.val_tasks_file), "steps": 2, "batch_size": 8, "examples_per_task": 16,
                "eval_every": 0, "eval_at_start": False, "checkpoint_every": 1, "eval_batch_size": 128},
        "evo": {"method": "linear", "models": models, "parameters": {"weight": {"min": 0.0, "max": 1.0}},
                "tasks": str(fam.val_tasks_file), "data_ratio": 0.25, "popsize": 2, "max_evals": 2,
                "batch_size": 128},
    }
    out = {}
    for kind, cfg in cfgs.items():
        out[kind] = tmp_path / f"{kind}.yml"
        out[kind].write_text(yaml.safe_dump(cfg))
    return out


def test_cli_corrupt_pickled_and_old_checkpoints_end_in_one_error_line(tiny_fmnist_family, tmp_path, capsys):
    marker = tmp_path / "pwned"
    legacy = {"rmm": "rmm_checkpoint.pt", "dam": "dam_checkpoint.pt", "evo": "evo_checkpoint.pkl"}
    for kind, cfg in _configs(tiny_fmnist_family, tmp_path).items():
        out = tmp_path / f"out_{kind}"
        assert main(["search", kind, str(cfg), str(out), "-q"]) == 0, capsys.readouterr().err
        capsys.readouterr()
        path = out / f"{kind}_checkpoint.safetensors"
        good = path.read_bytes()
        if kind == "evo":
            assert checkpoint_best(out).score == json.loads((out / "result.json").read_text())["subset_best"]["score"]
        # truncated
        path.write_bytes(good[: len(good) // 2])
        assert main(["search", kind, str(cfg), str(out), "-q"]) == 2
        line = _error_line(capsys)
        assert str(path) in line and "--restart" in line and "truncated" in line, line
        # a crafted pickle under the new name
        _pickle_file(path, marker, torch_format=kind != "evo")
        assert main(["search", kind, str(cfg), str(out), "-q"]) == 2
        assert str(path) in _error_line(capsys)
        if kind == "evo":  # the engine's reader refuses it too (one line), never unpickles it
            with pytest.raises(MergeError, match="--restart"):
                checkpoint_best(out)
        # a crafted pickle under the old name, with no new checkpoint: refused, left in place
        path.unlink()
        _pickle_file(out / legacy[kind], marker, torch_format=kind != "evo")
        assert main(["search", kind, str(cfg), str(out), "-q"]) == 2
        line = _error_line(capsys)
        assert legacy[kind] in line and "old unsafe" in line and "--restart" in line, line
        assert (out / legacy[kind]).is_file()
        # --restart starts over; the run after it resumes from the new checkpoint
        assert main(["search", kind, str(cfg), str(out), "-q", "--restart"]) == 0
        assert path.is_file()
        assert main(["search", kind, str(cfg), str(out), "-q"]) == 0
        capsys.readouterr()
    assert not marker.exists()


def test_cli_rmm_refuses_a_checkpoint_of_another_configuration(tiny_fmnist_family, tmp_path, capsys):
    cfg = _configs(tiny_fmnist_family, tmp_path)["rmm"]
    out = tmp_path / "out"
    assert main(["search", "rmm", str(cfg), str(out), "-q"]) == 0
    capsys.readouterr()
    data = yaml.safe_load(cfg.read_text())
    data["seed"] = 7
    data["operators"][0]["parameters"]["weight"] = 0.5
    cfg.write_text(yaml.safe_dump(data))
    assert main(["search", "rmm", str(cfg), str(out), "-q"]) == 2
    line = _error_line(capsys)
    assert "different RMM search (differs in: operators, seed)" in line and "--restart" in line, line
    # more episodes with the same configuration continue the run
    data["seed"], data["operators"][0]["parameters"]["weight"] = 0, 1.0
    data["episodes"] = 8
    cfg.write_text(yaml.safe_dump(data))
    assert main(["search", "rmm", str(cfg), str(out), "-q"]) == 0
    assert json.loads((out / "result.json").read_text())["episodes"] == 8


@pytest.mark.parametrize("kind,flag,first,more", [("evo", "--max-evals", 2, 4), ("dam", "--steps", 2, 4),
                                                  ("rmm", "--episodes", 4, 8)])
def test_a_resumed_search_counts_the_whole_runs_wall_time(tiny_fmnist_family, tmp_path, capsys, kind, flag, first,
                                                          more):
    cfg = _configs(tiny_fmnist_family, tmp_path)[kind]
    out = tmp_path / "out"
    assert main(["search", kind, str(cfg), str(out), "-q", flag, str(first)]) == 0, capsys.readouterr().err
    before = json.loads((out / "result.json").read_text())["seconds"]
    path = out / f"{kind}_checkpoint.safetensors"
    tensors, state = load_checkpoint(path, kind=kind)
    assert 0 < state["seconds"] <= before
    # as if the first part had taken 1000 s: the resumed run's total must include it
    save_checkpoint(path, tensors, dict(state, seconds=1000.0), kind=kind)
    t0 = time.time()
    assert main(["search", kind, str(cfg), str(out), "-q", flag, str(more)]) == 0, capsys.readouterr().err
    after = json.loads((out / "result.json").read_text())["seconds"]
    assert 1000.0 < after <= 1000.0 + (time.time() - t0)
