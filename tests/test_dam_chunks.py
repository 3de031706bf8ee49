"""DAM's gradient accumulation within a step (`max_tokens_per_backward`): the chunks at their edges,
and the same gradients and coefficients chunked or not, on a tiny Llama (top-k, full-logit and
on-the-fly teachers; KL, MSE, entropy) and a tiny ViT."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from mergecore.eval.training import TaskData
from mergecore.search.dam import chunks as ch
from mergecore.search.dam.data import compute_teacher, run_model
from mergecore.search.dam.merger import Merger, find_slots
from mergecore.search.dam.run import DAMConfig
from mergecore.search.dam.search import DAMSearch, DAMSettings, LossSettings

from conftest import _tiny_config

# ----------------------------------------------------------------------------- the chunks


def _lm(lengths: list[int]) -> TaskData:
    items = [[1 + (k + j) % 90 for j in range(n)] for k, n in enumerate(lengths)]
    return TaskData("t", "lm", items, rows_total=sum(lengths))


def test_split_at_the_edges():
    assert ch.split([7, 8, 9], [5, 5, 5], 10) == [[7, 8], [9]]
    assert ch.split([7, 8, 9], [5, 5, 5], 15) == [[7, 8, 9]]  # exactly at the bound: one chunk
    assert ch.split([7, 8, 9], [5, 5, 5], 14) == [[7, 8], [9]]
    assert ch.split([7, 8, 9], [5, 5, 5], 1) == [[7], [8], [9]]  # one example per chunk
    assert ch.split([3], [300], 256) == [[3]]  # longer than the bound: still a chunk of its own
    assert ch.split([1, 2, 3, 4], [300, 2, 300, 1], 256) == [[1], [2], [3], [4]]
    # the padded length counts: a long example widens the chunk it joins
    assert ch.split([1, 2, 3], [2, 2, 6], 8) == [[1, 2], [3]]
    assert ch.split([1, 2, 3], [6, 2, 2], 12) == [[1, 2], [3]]
    assert ch.split([], [], 4) == []


def test_chunk_weights_are_shares_of_the_loss_rows():
    d = _lm([4, 6, 2, 8])
    assert ch.example_tokens(d, [3, 0]) == [8, 4]
    assert ch.chunks(d, [0, 1, 2, 3], 10 ** 9) == [([0, 1, 2, 3], 1.0)]
    got = ch.chunks(d, [0, 1, 2, 3], 12)  # [4, 6] -> 12, then [2, 8] -> 16 > 12: [2], [8]
    assert [p for p, _ in got] == [[0, 1], [2], [3]]
    assert [w for _, w in got] == pytest.approx([10 / 20, 2 / 20, 8 / 20])  # non-pad tokens, not padded ones
    img = TaskData("i", "image", torch.zeros(10, 1, 4, 4))
    assert ch.example_tokens(img, [0, 1]) == [1, 1]  # one token per image
    got = ch.chunks(img, list(range(10)), 4)
    assert [len(p) for p, _ in got] == [4, 4, 2] and [w for _, w in got] == pytest.approx([0.4, 0.4, 0.2])
    txt = TaskData("c", "text_cls", [[1, 2, 3], [4, 5, 6, 7, 8]])
    assert ch.chunks(txt, [0, 1], 5) == [([0], 0.5), ([1], 0.5)]  # one row per text


def test_the_bound_is_validated_and_reaches_the_loop():
    with pytest.raises(ValidationError, match="max_tokens_per_backward"):
        DAMConfig(models=["a"], train_tasks="t.yml", max_tokens_per_backward=0)
    cfg = DAMConfig(models=["a"], train_tasks="t.yml")
    assert cfg.max_tokens_per_backward == 4096 and cfg.settings().max_tokens_per_backward == 4096
    assert DAMConfig(models=["a"], train_tasks="t.yml", max_tokens_per_backward=1).settings() \
        .max_tokens_per_backward == 1


def test_teacher_forwards_are_bounded_too():
    lm = _model("llama", 1)
    d = _lm([5, 9, 3, 12, 7, 4])
    shapes = []

    def forward(kw):
        shapes.append(tuple(kw["input_ids"].shape))
        return run_model(lm, None, kw)

    whole = compute_teacher(d, forward, batch_size=4, top_k=8)
    assert shapes == [(4, 12), (2, 7)]
    shapes.clear()
    bounded = compute_teacher(d, forward, batch_size=4, top_k=8, max_tokens=18)
    assert shapes == [(2, 9), (1, 3), (1, 12), (2, 7)] and all(a * b <= 18 or a == 1 for a, b in shapes)
    assert [v.shape for v in bounded.values] == [v.shape for v in whole.values]
    for a, b in zip(bounded.values + bounded.indices, whole.values + whole.indices):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- the same training


def _model(arch: str, seed: int, base_seed: int | None = None):
    config, cls = _tiny_config(arch)
    torch.manual_seed(seed if base_seed is None else base_seed)
    m = cls(config).eval()
    if base_seed is not None:
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in m.parameters():
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return m.requires_grad_(False)


def _setup(arch: str, teachers: str, top_k=None):
    """Base, two experts, two tasks of varied lengths (or images), the merger's sources."""
    base = _model(arch, 0)
    experts = [_model(arch, s, base_seed=0) for s in (1, 2)]
    g = torch.Generator().manual_seed(3)
    datas = []
    for i in range(2):
        if arch == "vit":
            d = TaskData(f"t{i}", "image", torch.randn(10, 1, 16, 16, generator=g), rows_total=10)
        else:
            lengths = torch.randint(3, 13, (10,), generator=g).tolist()
            items = [torch.randint(4, 96, (n,), generator=g).tolist() for n in lengths]
            d = TaskData(f"t{i}", "lm", items, rows_total=sum(lengths))
        if teachers == "cache":
            d.teacher = compute_teacher(d, lambda kw, m=experts[i]: run_model(m, None, kw), batch_size=4, top_k=top_k)
        datas.append(d)
    tp = [dict(e.state_dict()) for e in experts] if teachers == "on_the_fly" else None
    return base, experts, datas, tp


def _search(setup, max_tokens: int, loss: LossSettings, sgd: bool = False, lr: float = 0.01, **kw) -> DAMSearch:
    base, experts, datas, tp = setup
    merger = Merger(find_slots(base), n_models=2)
    for e in experts:
        merger.add_source(dict(e.named_parameters()), "expert")
    settings = DAMSettings(steps=3, batch_size=6, lr=lr, eval_every=0, eval_at_start=False, checkpoint_every=0,
                           max_tokens_per_backward=max_tokens, loss=loss, **kw)
    search = DAMSearch(base, merger, datas, settings, teacher_params=tp)
    if sgd:  # coefficients that move by exactly lr x gradient
        search.optimizer = torch.optim.SGD(merger.parameters(), lr=lr)
    return search


def _grads(search: DAMSearch, steps: int) -> list[list[torch.Tensor]]:
    """Train `steps` steps, recording the coefficients' gradients each optimiser step sees."""
    seen: list[list[torch.Tensor]] = []
    step = search.optimizer.step

    def record(*a, **k):
        seen.append([p.grad.clone() for p in search.merger.parameters()])
        return step(*a, **k)

    search.optimizer.step = record
    for _ in range(steps):
        search.train_step()
    return seen


def _old_step_grads(search: DAMSearch) -> list[torch.Tensor]:
    """One step's gradient the way it was before chunks: each task's whole batch at once, then the
    regularisers."""
    s = search.settings
    merged = search.merger.merged()
    leaves = {n: t.detach().requires_grad_(True) for n, t in merged.items()}
    for i, d in enumerate(search.data):
        loss, _ = search._task_loss(i, d, leaves, d.batch_indices(search.step, s.batch_size, s.seed, i))
        loss.backward()
    pairs = [(merged[n], leaves[n].grad) for n in merged if leaves[n].grad is not None]
    torch.autograd.backward([m for m, _ in pairs], [g for _, g in pairs])
    reg, lo = search.regularizers(), s.loss
    if lo.lambda_cos or lo.lambda_l1 or lo.lambda_l2:
        (lo.lambda_cos * reg["cos"] + lo.lambda_l1 * reg["l1"] + lo.lambda_l2 * reg["l2"]).backward()
    out = [p.grad.clone() for p in search.merger.parameters()]
    for p in search.merger.parameters():
        p.grad = None
    return out


CASES = [
    ("llama", "cache", 8, LossSettings()),  # top-k teacher logits, forward KL
    ("llama", "cache", None, LossSettings(direction="reverse")),  # full logits
    ("llama", "on_the_fly", None, LossSettings(kind="mse", lambda_cos=0.1, lambda_l2=0.01)),
    ("llama", "none", None, LossSettings(kind="entropy")),
    ("vit", "cache", None, LossSettings()),
]


@pytest.mark.parametrize("arch,teachers,top_k,loss", CASES, ids=["topk-kl", "full-reverse", "fly-mse", "entropy",
                                                                 "vit-kl"])
def test_chunked_steps_equal_whole_batch_steps(arch, teachers, top_k, loss):
    setup = _setup(arch, teachers, top_k)
    whole = _search(setup, 10 ** 9, loss, sgd=True, lr=1.0, max_grad_norm=None)
    assert all(len(ch.chunks(d, d.batch_indices(0, 6, 0, i), 10 ** 9)) == 1 for i, d in enumerate(whole.data))
    # one chunk per batch: bit for bit the gradient of the loop before chunks
    want = _old_step_grads(whole)
    grads = _grads(whole, 3)
    assert all(torch.equal(a, b) for a, b in zip(grads[0], want))
    for bound in (1, 20):  # one example per chunk (every sequence is longer than 1 token); mixed chunks
        chunked = _search(setup, bound, loss, sgd=True, lr=1.0, max_grad_norm=None)
        if bound == 1:
            assert all(len(p) == 1 for p, _ in ch.chunks(chunked.data[0], list(range(6)), bound))
        for step, (got, ref) in enumerate(zip(_grads(chunked, 3), grads)):  # gradients of order 1e-2
            for a, b in zip(got, ref):
                torch.testing.assert_close(a, b, rtol=0, atol=1e-7, msg=lambda m: f"step {step + 1}: {m}")
        for a, b in zip(chunked.merger.parameters(), whole.merger.parameters()):  # SGD, lr 1: moved ~1e-2
            torch.testing.assert_close(a.detach(), b.detach(), rtol=0, atol=1e-6)
        for x, y in zip(chunked.history, whole.history):  # the reported losses and counters too
            assert x["loss"] == pytest.approx(y["loss"], rel=1e-5, abs=1e-7)
            assert x["examples_seen"] == y["examples_seen"] and x["tokens_seen"] == y["tokens_seen"]
            for k in y["terms"]:
                assert x["terms"][k] == pytest.approx(y["terms"][k], rel=1e-5, abs=1e-7)


def test_chunked_adamw_with_clipping_matches():
    # AdamW divides each gradient by its own running scale, so a coefficient whose gradient is near 0
    # moves by up to lr x the gradient's relative float error: agreement to lr x 1e-3 (1e-5)
    setup = _setup("llama", "cache", 8)
    a, b = _search(setup, 10 ** 9, LossSettings()), _search(setup, 7, LossSettings())
    for _ in range(4):
        a.train_step()
        b.train_step()
        assert a.history[-1]["grad_norm"] == pytest.approx(b.history[-1]["grad_norm"], rel=1e-5)
    for x, y in zip(a.merger.parameters(), b.merger.parameters()):
        torch.testing.assert_close(x.detach(), y.detach(), rtol=0, atol=1e-5)
