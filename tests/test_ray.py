"""Distributed evaluation on a local Ray instance: evo and RMM give the same results as the local
backend, with 1 and with 2 workers (one Ray instance for the module; it is slow to start)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

ray = pytest.importorskip("ray", reason="the Ray backend tests need ray (pip install 'mergecore[ray]')")

from mergecore.errors import MergeError  # noqa: E402
from mergecore.search.backend import BackendSpec, LocalBackend, RayBackend, WorkerFactory, make_backend  # noqa: E402


@pytest.fixture(scope="module")
def ray_instance():
    if ray.is_initialized():  # pragma: no cover - started by someone else
        yield
        return
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="WARNING")
    try:
        yield
    finally:
        ray.shutdown()


def _logs(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_evo_on_ray_equals_local(tiny_fmnist_family, tmp_path, ray_instance):
    from mergecore.search.evo.run import load_evo_config, run_evo

    fam = tiny_fmnist_family
    cfg = {
        "method": "ties", "base_model": str(fam.base), "models": [str(p) for p in fam.experts.values()],
        "parameters": {"weight": {"min": 0.0, "max": 1.0}, "density": {"min": 0.2, "max": 1.0}},
        "filters": ["attention"], "tasks": str(fam.val_tasks_file), "data_ratio": 0.5, "popsize": 4,
        "max_evals": 8, "seed": 3,
    }
    (tmp_path / "s.yml").write_text(yaml.safe_dump(cfg))
    config, root = load_evo_config(tmp_path / "s.yml")
    runs = {}
    for name, backend, workers in (("local", "local", 1), ("ray1", "ray", 1), ("ray2", "ray", 2)):
        c = config.model_copy(update={"backend": backend, "workers": workers})
        runs[name] = run_evo(c, root, tmp_path / name)
        assert runs[name]["backend"]["kind"] == backend and runs[name]["backend"]["workers"] == workers
    logs = {n: _logs(tmp_path / n / "evo_log.jsonl") for n in runs}
    for n in ("ray1", "ray2"):
        assert [g["scores"] for g in logs[n]] == [g["scores"] for g in logs["local"]]
        assert [g["sigma"] for g in logs[n]] == [g["sigma"] for g in logs["local"]]
        assert runs[n]["best"]["genome"] == runs["local"]["best"]["genome"]
        assert runs[n]["best"]["scores"] == runs["local"]["best"]["scores"]
        assert (tmp_path / n / "recipe.yml").read_text() == (tmp_path / "local" / "recipe.yml").read_text()
    # the Ray instance of the test is shared, not shut down by the searches
    assert ray.is_initialized()


def test_rmm_on_ray_equals_local(tiny_fmnist_family, tmp_path, ray_instance):
    from mergecore.search.config import load_config
    from mergecore.search.rmm.run import RMMConfig, run_rmm

    fam = tiny_fmnist_family
    cfg = {
        "base_model": str(fam.base), "models": [str(p) for p in fam.experts.values()],
        "operators": [{"name": "avg", "method": "linear", "parameters": {"weight": 1.0}},
                      {"name": "dare", "method": "dare_linear", "parameters": {"weight": 1.0, "density": 0.5,
                                                                              "lambda": 0.3}}],
        "tasks": str(fam.val_tasks_file), "data_ratio": 0.25, "episodes": 8, "update_every": 4,
        "rerank_top": 1, "ppo": {"epochs": 4}, "seed": 0,
    }
    (tmp_path / "r.yml").write_text(yaml.safe_dump(cfg))
    config, root = load_config(tmp_path / "r.yml", RMMConfig)
    def run(c, out):
        return run_rmm(c, root, out)

    runs = {}
    for name, backend, workers in (("local", "local", 1), ("ray1", "ray", 1), ("ray2", "ray", 2)):
        c = config.model_copy(update={"backend": backend, "workers": workers})
        runs[name] = run(c, tmp_path / name)
    logs = {n: _logs(tmp_path / n / "rmm_log.jsonl") for n in runs}
    keys = ("episode", "subset", "actions", "raw_reward", "dar_reward", "best_reward", "evaluations", "metrics")
    want = [{k: e[k] for k in keys} for e in logs["local"]]
    assert len(want) == 8 and any(e["raw_reward"] != config.back_penalty for e in want)
    for n in ("ray1", "ray2"):
        assert [{k: e[k] for k in keys} for e in logs[n]] == want
        assert [e.get("ppo") for e in logs[n]] == [e.get("ppo") for e in logs["local"]]
        assert runs[n]["best"] == runs["local"]["best"]
        if (tmp_path / "local" / "recipe.yml").exists():
            assert (tmp_path / n / "recipe.yml").read_text() == (tmp_path / "local" / "recipe.yml").read_text()


def test_backend_errors_and_local_backend(tiny_fmnist_family, ray_instance):
    from mergecore.search.evo.genome import Bounds, Genome
    from mergecore.search.evo.worker import EvalSpec, EvoWorker

    fam = tiny_fmnist_family
    genome = Genome(method="linear", models=("/nowhere/a", "/nowhere/b"), parameters=(("weight", Bounds(0, 1)),))
    factory = WorkerFactory(EvoWorker, (genome, EvalSpec(tasks=str(fam.val_tasks_file))))
    # a worker that cannot start is reported when the backend starts, as the worker's own error
    with pytest.raises(MergeError, match="/nowhere/a"):
        RayBackend(factory, 1)
    with pytest.raises(MergeError, match="/nowhere/a"):
        make_backend(BackendSpec(backend="local"), factory)
    with pytest.raises(ValueError):
        BackendSpec(workers=0)

    class Double:
        def evaluate(self, x):
            return 2 * x

    local = LocalBackend(WorkerFactory(Double))
    seen = []
    assert local.map([1, 2, 3], on_result=lambda i, r: seen.append((i, r))) == [2, 4, 6]
    assert seen == [(0, 2), (1, 4), (2, 6)]
