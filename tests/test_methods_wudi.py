"""wudi: the closed-form gradient against autograd on the literal objective, the Adam trajectory
against FusionBench's autograd + torch.optim.Adam loop (transcribed below), the non-matrix
fallback, errors, owned inputs, the --dry-run cost and a full merge of tiny checkpoints."""

from __future__ import annotations

import pytest
import torch

from _merge_helpers import load_weights, write_recipe
from mergecore.cli import main
from mergecore.errors import MergeError
from mergecore.merging import merge
from mergecore.methods import get_method
from mergecore.methods.base import OwnedInputs
from mergecore.methods.wudi import adam, gradient, gram_terms
from mergecore.recipe import recipe_from_dict


def run(tensors, base, **params):
    return get_method("wudi")(tensors, base, {k.rstrip("_"): v for k, v in params.items()})


def family(n, shape, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g, dtype=dtype)
    return base, [base + 0.1 * torch.randn(shape, generator=g, dtype=dtype) for _ in range(n)]


def ref_wudi(tvs: torch.Tensor, iter_num: int, lr: float = 1e-5) -> torch.Tensor:
    """tanganke/fusion_bench: fusion_bench/method/wudi/wudi.py `wudi_merging`, the loop for one
    2-D key (tvs = the stacked task vectors), on the tensors' own device."""
    new_vector = torch.nn.Parameter(torch.sum(tvs, dim=0))
    optimizer = torch.optim.Adam([new_vector], lr=lr, weight_decay=0)
    l2_norms = torch.square(torch.norm(tvs.reshape(tvs.shape[0], -1), p=2, dim=-1))
    for _ in range(iter_num):
        disturbing_vectors = new_vector.unsqueeze(0) - tvs
        product = torch.matmul(disturbing_vectors, tvs.transpose(1, 2))
        loss = torch.sum(torch.square(product) / l2_norms.unsqueeze(-1).unsqueeze(-1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return new_vector.detach()


def literal_loss(tau_m, taus):
    """Σ_i ‖(τ_m − τ_i)τ_iᵀ‖²_F / ‖τ_i‖²_F, written from the paper's equation."""
    return sum(((tau_m - t) @ t.T).square().sum() / t.square().sum() for t in taus)


# ------------------------------------------------------------------ the optimisation


@pytest.mark.parametrize("shape, n", [((7, 5), 2), ((4, 9), 3), ((12, 12), 4)])
def test_gradient_equals_autograd_of_the_literal_objective(shape, n):
    base, models = family(n, shape, n, torch.float64)
    taus = [m - base for m in models]
    total, a, b = gram_terms(models, base)
    torch.testing.assert_close(total, sum(taus))
    g = torch.Generator().manual_seed(7)
    for point in (total, torch.randn(shape, generator=g, dtype=torch.float64)):
        x = point.clone().requires_grad_(True)
        literal_loss(x, taus).backward()
        torch.testing.assert_close(gradient(point, a, b), x.grad, atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("dtype, lr, atol", [(torch.float64, 1e-2, 1e-12), (torch.float32, 1e-5, 1e-6)])
def test_adam_trajectory_matches_the_reference_loop(dtype, lr, atol):
    base, models = family(3, (10, 6), 11, dtype)
    tvs = torch.stack([m - base for m in models])
    for steps in (1, 2, 5):
        out = run(models, base, steps=steps, lr=lr, lambda_=1.0)
        torch.testing.assert_close(out - base, ref_wudi(tvs, steps, lr), atol=atol, rtol=0)


def test_adam_reduces_the_objective_and_scales():
    base, models = family(3, (16, 8), 12)
    taus = [m - base for m in models]
    start = literal_loss(sum(taus), taus).item()
    merged = run(models, base, steps=60, lr=1e-3, lambda_=1.0) - base
    assert literal_loss(merged, taus).item() < 0.7 * start
    # λ scales the optimised task vector; 0 steps (or lr 0) is task arithmetic Σ τ_i
    torch.testing.assert_close(run(models, base, steps=60, lr=1e-3, lambda_=0.5), base + 0.5 * merged)
    torch.testing.assert_close(run(models, base, steps=0), base + sum(taus), atol=1e-6, rtol=0)
    torch.testing.assert_close(run(models, base, lr=0.0), base + sum(taus), atol=1e-6, rtol=0)


def test_default_run_matches_the_reference_at_300_steps():
    base, models = family(2, (6, 4), 13)
    tvs = torch.stack([m - base for m in models])
    torch.testing.assert_close(run(models, base), base + ref_wudi(tvs, 300), atol=1e-6, rtol=0)


def test_adam_helper_is_torch_adam():
    base, models = family(2, (5, 3), 14, torch.float64)
    total, a, b = gram_terms(models, base)
    p = torch.nn.Parameter(total.clone())
    opt = torch.optim.Adam([p], lr=0.05)
    for _ in range(4):
        opt.zero_grad()
        p.grad = gradient(p.detach(), a, b)
        opt.step()
    torch.testing.assert_close(adam(total, a, b, 4, 0.05), p.detach(), atol=1e-13, rtol=0)


def test_zero_task_vector_has_weight_zero():
    base, models = family(2, (6, 5), 15)
    out = run(models + [base.clone()], base, steps=3, lr=1e-3)  # the reference divides 0 by 0
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, run(models, base, steps=3, lr=1e-3), atol=1e-6, rtol=0)


# ------------------------------------------------------------------ fallback, errors, streaming


@pytest.mark.parametrize("shape", [(9,), (), (2, 3, 4)])
def test_other_tensors_take_the_mean_of_task_vectors(shape):
    base, models = family(3, shape, 16)
    out = run(models, base, steps=5, lambda_=0.8)
    torch.testing.assert_close(out, base + 0.8 * sum(m - base for m in models) / 3, atol=1e-6, rtol=0)


def test_one_line_errors_and_schema():
    base, models = family(2, (3, 4), 17)
    with pytest.raises(MergeError, match="^wudi needs a base_model$"):
        run(models, None)
    with pytest.raises(MergeError, match="^wudi takes at least two fine-tuned models besides the base_model, got 1$"):
        run(models[:1], base)
    m = get_method("wudi")
    assert {p.name: p.default for p in m.params} == {"steps": 300, "lr": 1e-5, "lambda": 1.0}
    assert set(m.tags) == {"matrices", "streaming"} and "arXiv:2503.08099" in m.paper
    with pytest.raises(MergeError, match="'steps'"):
        m.param("steps").coerce(-1)


@pytest.mark.parametrize("shape", [(6, 7), (11,)])
def test_owned_inputs_are_read_once_in_order(shape):
    base, models = family(3, shape, 18)
    reads: list[int] = []

    def loader(i):
        def load():
            reads.append(i)
            return models[i].clone()
        return load

    out = get_method("wudi")(OwnedInputs([loader(i) for i in range(3)]), base, {"steps": 4, "lr": 1e-3})
    assert reads == [0, 1, 2]
    torch.testing.assert_close(out, run(models, base, steps=4, lr=1e-3), atol=0, rtol=0)


# ------------------------------------------------------------------ cost, dry run, full merge


def test_cost():
    cost = get_method("wudi").cost
    assert cost((10,), 2, {"steps": 300}) is None
    c = cost((64, 32), 2, {"steps": 10})
    assert c.flops == 2 * (2 * 32 * 64 * 32 + 2 * 64 * 32 * 32) + 10 * (2 * 64 * 32 * 32 + 12 * 64 * 32)
    assert c.extra_bytes == 4 * (2 * 32 * 32 + 6 * 64 * 32) and "10 Adam steps" in c.note


def _recipe(fam, **params):
    return {"merge_method": "wudi", "base_model": str(fam["base"]),
            "models": [{"model": str(fam["a"])}, {"model": str(fam["b"])}], "parameters": params,
            "dtype": "float32"}


def test_dry_run_lists_the_cost(llama_family, tmp_path, capsys):
    recipe = write_recipe(tmp_path / "r.yml", _recipe(llama_family, steps=50))
    assert main(["merge", str(recipe), str(tmp_path / "o"), "--dry-run"]) == 0
    text = capsys.readouterr().out
    assert "method: wudi" in text and "extra cost: wudi: 50 Adam steps per matrix" in text
    assert "extra compute:" in text and "extra working memory:" in text
    assert not (tmp_path / "o").exists()


def test_full_merge_of_tiny_models(llama_family, tmp_path):
    params = {"steps": 4, "lr": 1e-4, "lambda": 0.9}
    merge(recipe_from_dict(_recipe(llama_family, **params)), tmp_path / "out")
    out = load_weights(tmp_path / "out")
    base, a, b = (load_weights(llama_family[k]) for k in ("base", "a", "b"))
    assert set(out) == set(base)
    method = get_method("wudi")
    for key in out:
        expected = method([a[key].float(), b[key].float()], base[key].float(), method.resolve_params(params, 2)[0])
        torch.testing.assert_close(out[key], expected, atol=1e-6, rtol=0, msg=key)
    matrix = "model.layers.0.self_attn.q_proj.weight"
    mean = base[matrix] + 0.9 * ((a[matrix] - base[matrix]) + (b[matrix] - base[matrix]))
    assert not torch.allclose(out[matrix], mean, atol=1e-7)  # the Adam steps moved it off Σ τ_i
