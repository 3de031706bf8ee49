"""The training loops the offline families use (pretraining and expert fine-tuning).

Plain PyTorch: AdamW, linear warm-up then cosine decay, gradient clipping, seeded batch
sampling. `train` (image classifiers): cross-entropy over the logits of `classes` only (a
task-subset expert never sees the other outputs), so all experts keep one head shape and merge
cleanly. `train_text` (text classifiers): the same on class-balanced batches of tokenised
texts, over the first `num_outputs` logits, updating only the parameters that require grad. `train_lm` (causal LMs): next-token cross-entropy on random windows of a token stream,
updating only the parameters it is given (e.g. LoRA adapters).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F

from mergecore.events import CancelToken

BatchFn = Callable[[torch.Generator], tuple[torch.Tensor, torch.Tensor]]
StepCallback = Callable[[int, int, float], None]  # (step done, steps, running loss)


@dataclass
class TrainStats:
    steps: int
    seconds: float
    first_loss: float
    last_loss: float


def class_batches(images: torch.Tensor, labels: torch.Tensor, batch_size: int,
                  classes: Optional[Sequence[int]] = None) -> BatchFn:
    """Random batches of preprocessed images; labels become positions in `classes`."""
    if classes is not None:
        lut = torch.full((int(labels.max()) + 1,), -1, dtype=torch.long)
        for pos, c in enumerate(classes):
            if c < len(lut):
                lut[c] = pos
        targets = lut[labels]
        keep = targets >= 0
        images, targets = images[keep], targets[keep]
    else:
        targets = labels
    n = len(targets)
    if n == 0:
        raise ValueError("no training examples for these classes")

    def batch(gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.randint(0, n, (min(batch_size, n),), generator=gen)
        return images[idx], targets[idx]

    return batch


def rotation_batches(images: torch.Tensor, batch_size: int) -> BatchFn:
    """Self-supervised rotation prediction: each image turned by k·90°, the target is k (0-3)."""
    n = len(images)

    def batch(gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.randint(0, n, (min(batch_size, n),), generator=gen)
        k = torch.randint(0, 4, (len(idx),), generator=gen)
        x = images[idx].clone()
        for r in range(1, 4):
            sel = k == r
            if sel.any():
                x[sel] = torch.rot90(x[sel], r, dims=(-2, -1))
        return x, k

    return batch


def _optimise(model: torch.nn.Module, params: list[torch.nn.Parameter],
              loss_of: Callable[[torch.Generator], torch.Tensor], *, steps: int, lr: float, weight_decay: float,
              warmup_steps: int, seed: int, grad_clip: float, on_step: Optional[StepCallback],
              cancel: Optional[CancelToken]) -> TrainStats:
    """The loop both trainers share: AdamW on `params`, linear warm-up then cosine decay, gradient
    clipping, `loss_of(generator)` per step (seeded batch sampling), a running loss."""
    cancel = cancel or CancelToken()
    model.train()
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)

    def factor(s: int) -> float:
        warm = min(1.0, (s + 1) / warmup_steps) if warmup_steps else 1.0
        return warm * 0.5 * (1 + math.cos(math.pi * min(1.0, s / max(1, steps))))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    gen = torch.Generator().manual_seed(seed)
    start = time.time()
    first = last = float("nan")
    running = None
    for step in range(steps):
        cancel.check()
        loss = loss_of(gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if grad_clip:
            torch.nn.utils.clip_grad_norm_(params, grad_clip)
        opt.step()
        sched.step()
        v = float(loss.detach())
        if step == 0:
            first = v
        running = v if running is None else 0.9 * running + 0.1 * v
        last = running
        if on_step:
            on_step(step + 1, steps, running)
    model.eval()
    return TrainStats(steps, time.time() - start, first, last)


def train(model: torch.nn.Module, batches: BatchFn, *, steps: int, lr: float, weight_decay: float = 0.05,
          warmup_steps: int = 0, seed: int = 0, num_outputs: Optional[int] = None,
          classes: Optional[Sequence[int]] = None, grad_clip: float = 1.0,
          on_step: Optional[StepCallback] = None, cancel: Optional[CancelToken] = None) -> TrainStats:
    """Train `model` (an image classifier taking pixel_values) for `steps` steps.

    Only some logits take part in the loss: the first `num_outputs`, or those of `classes`
    (targets are then positions in `classes`, as `class_batches` makes them).
    """
    cls_index = torch.as_tensor(list(classes)) if classes is not None else None

    def loss_of(gen: torch.Generator) -> torch.Tensor:
        x, y = batches(gen)
        logits = model(pixel_values=x).logits
        if cls_index is not None:
            logits = logits[:, cls_index]
        elif num_outputs is not None:
            logits = logits[:, :num_outputs]
        return F.cross_entropy(logits, y)

    return _optimise(model, list(model.parameters()), loss_of, steps=steps, lr=lr, weight_decay=weight_decay,
                     warmup_steps=warmup_steps, seed=seed, grad_clip=grad_clip, on_step=on_step, cancel=cancel)


@torch.no_grad()
def features(model: torch.nn.Module, images: torch.Tensor, batch_size: int = 512,
             cancel: Optional[CancelToken] = None) -> torch.Tensor:
    """What a ViT classifier's head sees: the final layer-normed [CLS] token."""
    model.eval()
    out = []
    for i in range(0, len(images), batch_size):
        if cancel:
            cancel.check()
        h = model.vit(pixel_values=images[i:i + batch_size]).last_hidden_state
        out.append(h[:, 0])
    return torch.cat(out) if out else torch.empty(0)


def linear_probe(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor,
                 num_classes: int, steps: int = 300, lr: float = 0.05, seed: int = 0) -> float:
    """Accuracy of a linear classifier trained (full batch, Adam) on frozen features."""
    torch.manual_seed(seed)
    mu, sd = train_x.mean(0), train_x.std(0) + 1e-6
    tx, vx = (train_x - mu) / sd, (test_x - mu) / sd
    lin = torch.nn.Linear(tx.shape[1], num_classes)
    opt = torch.optim.Adam(lin.parameters(), lr=lr, weight_decay=1e-4)
    for _ in range(steps):
        loss = F.cross_entropy(lin(tx), train_y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        return float((lin(vx).argmax(-1) == test_y).float().mean())


# ---------------------------------------------------------------------------------------------
# text classifiers (the minilm-textclass family)

TextBatchFn = Callable[[torch.Generator], tuple[dict[str, torch.Tensor], torch.Tensor]]


def text_batches(ids: Sequence[Sequence[int]], labels: Sequence[int], batch_size: int, pad_id: int) -> TextBatchFn:
    """Class-balanced random batches: per row a class drawn uniformly, then one of its texts
    (so a large class does not drown a small one); padded to the longest row."""
    from mergecore.eval.prep import pad_batch

    by_class: dict[int, list[int]] = {}
    for i, y in enumerate(labels):
        by_class.setdefault(int(y), []).append(i)
    if not by_class:
        raise ValueError("no training texts")
    classes = sorted(by_class)
    pools = [torch.as_tensor(by_class[c]) for c in classes]

    def batch(gen: torch.Generator) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        cls = torch.randint(0, len(classes), (batch_size,), generator=gen).tolist()
        pick = [int(pools[c][torch.randint(0, len(pools[c]), (1,), generator=gen)]) for c in cls]
        x, mask = pad_batch([ids[i] for i in pick], pad_id)
        return {"input_ids": x, "attention_mask": mask}, torch.as_tensor([classes[c] for c in cls])

    return batch


def train_text(model: torch.nn.Module, batches: TextBatchFn, *, num_outputs: int, steps: int, lr: float,
               weight_decay: float = 0.01, warmup_steps: int = 0, seed: int = 0, grad_clip: float = 1.0,
               on_step: Optional[StepCallback] = None, cancel: Optional[CancelToken] = None) -> TrainStats:
    """Fine-tune a sequence classifier (cross-entropy over its first `num_outputs` logits) with
    `train`'s schedule; the parameters that require grad are trained, dropout is seeded by `seed`."""
    torch.manual_seed(seed)

    def loss_of(gen: torch.Generator) -> torch.Tensor:
        x, y = batches(gen)
        return F.cross_entropy(model(**x).logits[:, :num_outputs], y)

    params = [p for p in model.parameters() if p.requires_grad]
    return _optimise(model, params, loss_of, steps=steps, lr=lr, weight_decay=weight_decay,
                     warmup_steps=warmup_steps, seed=seed, grad_clip=grad_clip, on_step=on_step, cancel=cancel)


# ---------------------------------------------------------------------------------------------
# causal language models (the smollm2-domains family)


def token_windows(ids: torch.Tensor, seq_len: int, batch_size: int) -> BatchFn:
    """Random windows of `seq_len` tokens from one long token stream (documents joined by EOS);
    the targets are the inputs (the model shifts them)."""
    ids = torch.as_tensor(ids, dtype=torch.long).flatten()
    n = len(ids) - seq_len
    if n < 1:
        raise ValueError(f"the training text has {len(ids)} tokens; a window needs {seq_len + 1}")

    def batch(gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        starts = torch.randint(0, n + 1, (batch_size,), generator=gen)
        x = torch.stack([ids[s:s + seq_len] for s in starts.tolist()])
        return x, x

    return batch


def train_lm(model: torch.nn.Module, batches: BatchFn, *, params: Sequence[torch.nn.Parameter], steps: int,
             lr: float, weight_decay: float = 0.0, warmup_steps: int = 0, seed: int = 0, grad_clip: float = 1.0,
             on_step: Optional[StepCallback] = None, cancel: Optional[CancelToken] = None) -> TrainStats:
    """Fine-tune a causal LM (next-token cross-entropy) on `batches`, updating only `params`, with
    `train`'s schedule (AdamW, warm-up then cosine decay, gradient clipping, seeded batches)."""

    def loss_of(gen: torch.Generator) -> torch.Tensor:
        x, y = batches(gen)
        return model(input_ids=x, labels=y, use_cache=False).loss

    return _optimise(model, list(params), loss_of, steps=steps, lr=lr, weight_decay=weight_decay,
                     warmup_steps=warmup_steps, seed=seed, grad_clip=grad_clip, on_step=on_step, cancel=cancel)
