"""The one search program (mergecore.search.base): output folder, events.jsonl, the replay through
mergecore.merge and the scores measured on the replayed checkpoint, result.json; config paths
relative to the config only; the event lines the CLI and the app share."""

from __future__ import annotations

import json
from pathlib import Path
from typing import ClassVar, Optional

import pytest
import yaml

from mergecore.cli import main
from mergecore.errors import MergeError
from mergecore.events import Event
from mergecore.search.base import EvalSpec, Found, SearchRun, read_events, run_search
from mergecore.search.report import event_line


class AverageSearch:
    """A stand-in search: 'finds' the average of the experts, scored as a real search scores."""

    kind: ClassVar[str] = "average"

    def __init__(self, fam, final: bool = True, misreport: float = 0.0):
        self.fam = fam
        self.final: Optional[EvalSpec] = EvalSpec(str(fam.tasks_file), label="test") if final else None
        self.misreport = misreport
        self.scored = EvalSpec(str(fam.val_tasks_file), subset=0.5, subset_index=1, processor_from=str(fam.base))

    def sources(self) -> list[str]:
        return [str(self.fam.base), *map(str, self.fam.experts.values())]

    def run(self, run: SearchRun) -> Found:
        from mergecore.executor import merge_in_memory
        from mergecore.plan import plan_merge
        from mergecore.recipe import recipe_from_dict

        run.event("average.start", {"models": len(self.fam.experts)})
        recipe = recipe_from_dict({"merge_method": "linear", "dtype": "float32",
                                   "models": [{"model": str(p), "parameters": {"weight": 1.0}}
                                              for p in self.fam.experts.values()]})
        model = merge_in_memory(plan_merge(recipe), run.pool.fresh_model(self.fam.base))
        res = self.scored.evaluator(run.pool).evaluate(model, subset_index=self.scored.subset_index)
        return Found(recipe, {"mean": res.mean}, {"mean": res.mean}, self.scored, res.mean + self.misreport)


def test_the_program_replays_and_scores_the_checkpoint(tiny_fmnist_family, tmp_path):
    from mergecore.eval import Evaluator

    fam = tiny_fmnist_family
    seen: list[Event] = []
    out = tmp_path / "out"
    summary = run_search(AverageSearch(fam), out, on_event=seen.append)
    assert json.loads((out / "result.json").read_text()) == json.loads(json.dumps(summary))
    assert (out / "recipe.yml").is_file() and (out / "model" / "config.json").is_file()
    # the final scores and the re-measured search score come from the checkpoint in OUT/model
    test = Evaluator(fam.tasks_file, batch_size=128).evaluate(out / "model")
    assert summary["final"] == {"tasks": "test", "mean": test.mean, "scores": test.scores}
    assert summary["replay"]["matches"] is True and summary["replay"]["mean"] == pytest.approx(summary["mean"])
    assert summary["replay"]["model"] == str(out / "model") and "wrote" in summary["replay"]["merge"]
    # every event, in order, is in events.jsonl and reads back
    kinds = [e.kind for e in seen]
    assert kinds == ["average.start", "search.replayed", "average.done"]
    assert [(e.kind, e.data) for e in read_events(out)] == [(e.kind, e.data) for e in seen]
    # a resumed run appends to the log; a restart begins it again
    run_search(AverageSearch(fam, final=False), out, replay=True)
    assert [e.kind for e in read_events(out)] == kinds * 2
    (out / "events.jsonl").write_text((out / "events.jsonl").read_text() + '{"kind": "cut sh')  # a crash mid-line
    assert len(read_events(out)) == 6
    run_search(AverageSearch(fam, final=False), out, resume=False)
    assert [e.kind for e in read_events(out)] == ["average.start", "average.done"]  # no replay asked, none done
    assert read_events(tmp_path / "nowhere") == []


def test_a_replay_that_scores_otherwise_is_reported(tiny_fmnist_family, tmp_path):
    seen: list[Event] = []
    summary = run_search(AverageSearch(tiny_fmnist_family, final=False, misreport=0.25), tmp_path / "o",
                         on_event=seen.append, replay=True)
    assert summary["replay"]["matches"] is False
    warning = [event_line(e) for e in seen if e.kind == "search.mismatch"]
    assert len(warning) == 1 and warning[0].startswith("warning: the replayed checkpoint scores")


def test_the_program_refuses_other_folders_before_running(tiny_fmnist_family, tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    (other / "mine.txt").write_text("mine")
    with pytest.raises(MergeError, match="not empty and was not written by mergecore"):
        run_search(AverageSearch(tiny_fmnist_family), other)
    assert sorted(p.name for p in other.iterdir()) == ["mine.txt"]


def test_config_paths_are_relative_to_the_config_and_never_to_the_current_directory(llama_family, tmp_path,
                                                                                    monkeypatch, capsys):
    import shutil

    here = tmp_path / "cwd"
    (here / "models").mkdir(parents=True)
    shutil.copytree(llama_family["a"], here / "models" / "base")  # a model where a careless lookup would find it
    (here / "tasks.yml").write_text("tasks: []\n")
    cfg_dir = tmp_path / "configs"
    cfg_dir.mkdir()
    cfg = cfg_dir / "rmm.yml"
    monkeypatch.chdir(here)
    out = tmp_path / "out"
    cfg.write_text(yaml.safe_dump({"base_model": "models/base", "models": [str(llama_family["b"])],
                                   "tasks": "tasks.yml"}))
    assert main(["search", "rmm", str(cfg), str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert "model 'models/base' not found: no folder " + str(cfg_dir / "models" / "base") in err, err
    assert "relative to its folder" in err and "\n" not in err
    cfg.write_text(yaml.safe_dump({"base_model": str(llama_family["a"]), "models": [str(llama_family["b"])],
                                   "tasks": "tasks-trian.yml"}))
    assert main(["search", "rmm", str(cfg), str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert f"tasks file not found: tasks-trian.yml; looked for {cfg_dir / 'tasks-trian.yml'}" in err, err
    assert not out.exists()  # a config error leaves no output folder behind


def test_event_lines():
    ep = {"episode": 0, "raw_reward": 50.0, "dar_reward": 50.0, "best_reward": None, "depth": 3,
          "eval_seconds": 0.5, "evaluations": 1}
    assert event_line(Event("rmm.episode", ep)).startswith("episode    1  reward   50.000")
    assert event_line(Event("rmm.episode", dict(ep, replayed=True))) is None
    assert event_line(Event("rmm.done", {})) is None and event_line(Event("nobody.knows", {})) is None
    step = {"step": 5, "steps": 20, "loss": 1.0, "terms": {"kl": 1.0, "kl/a": 1.0}, "lr": 0.01,
            "examples_seen": 10, "tokens_seen": 0, "seconds": 0.1}
    assert event_line(Event("dam.step", step)) == "step     5/20  loss 1  kl 1  lr 0.01  examples 10  0.10s"
    assert event_line(Event("dam.step", step), every=10) is None
    assert event_line(Event("dam.step", dict(step, step=20)), every=10) is not None  # the last one shows
    assert event_line(Event("evo.loading", {"workers": 2, "backend": "ray", "genes": 4, "models": ["a"]})) == \
        "4 genes; loading 1 models in 2 Ray workers ..."
    assert event_line(Event("search.replayed", {"summary": "wrote 3 tensors"})) == "wrote 3 tensors"


def test_dam_resumes_with_its_history_replayed(tiny_fmnist_family, tmp_path):
    """What a UI asks for (replay_history): the steps and evaluations before the checkpoint come
    again as `replayed` events, before the `dam.resumed` one, from the checkpoint itself."""
    from mergecore.events import CancelToken
    from mergecore.search.dam.run import load_dam_config, run_dam

    fam = tiny_fmnist_family
    cfg_path = tmp_path / "dam.yml"
    cfg_path.write_text(yaml.safe_dump({
        "base_model": str(fam.base), "models": [str(p) for p in fam.experts.values()],
        "train_tasks": str(fam.val_tasks_file), "steps": 4, "batch_size": 8, "examples_per_task": 16,
        "eval_every": 2, "eval_subset": 0.5, "checkpoint_every": 1, "eval_batch_size": 128}))
    cfg, root = load_dam_config(cfg_path)
    cancel = CancelToken()
    with pytest.raises(MergeError):
        run_dam(cfg, root, tmp_path / "o", cancel=cancel,
                on_event=lambda e: e.kind == "dam.step" and e.data["step"] == 3 and cancel.cancel())
    seen: list[Event] = []
    run_dam(cfg, root, tmp_path / "o", on_event=seen.append, replay_history=True)
    kinds = [e.kind for e in seen]
    before = seen[:kinds.index("dam.resumed")]
    replayed = [(e.kind, e.data["step"]) for e in before if e.data.get("replayed")]
    assert replayed == [("dam.eval", 0), ("dam.step", 1), ("dam.step", 2), ("dam.eval", 2), ("dam.step", 3)]
    assert [e.data["step"] for e in seen if e.kind == "dam.step" and not e.data.get("replayed")] == [4]
    logged = read_events(tmp_path / "o")  # both runs, in order: the first run's steps, then the second's
    assert [e.data["step"] for e in logged if e.kind == "dam.step" and not e.data.get("replayed")] == [1, 2, 3, 4]


def test_search_config_errors_name_the_file_and_key(tmp_path):
    from mergecore.search.config import load_config
    from mergecore.search.evo.run import EvoConfig

    p = tmp_path / "evo.yml"
    p.write_text("method: ties\nmodels: [a]\nparameters: {weight: {min: 0, max: 1}}\ntasks: t.yml\npopsiz: 3\n")
    with pytest.raises(MergeError, match=rf"^{p}: unknown key 'popsiz'$"):
        load_config(p, EvoConfig)
    p.write_text("method: ties\nmodels: []\nparameters: {}\ntasks: t.yml\n")
    with pytest.raises(MergeError, match=r"models: models must list at least one model \(and 1 more problems\)"):
        load_config(p, EvoConfig)
    assert Path(p).is_file()
