"""Gradient accumulation within one DAM step: a task's batch in chunks of bounded activations.

A chunk holds at most `max_tokens` tokens at once, counting its padded length (the longest
sequence in it) times its examples, or one token per image; a single example is always a chunk,
however long. Each task's loss is a mean over rows (one per image or text, or one per non-pad
token of a causal LM), so a chunk's loss weighted by its share of the batch's rows adds up to
the loss of the whole batch, and so do the gradients.
"""

from __future__ import annotations

from mergecore.eval.training import TaskData


def example_tokens(d: TaskData, idx: list[int]) -> list[int]:
    """Tokens each example of `idx` occupies (one per image)."""
    if d.kind == "image":
        return [1] * len(idx)
    return [len(d.items[k]) for k in idx]


def loss_rows(d: TaskData, idx: list[int]) -> int:
    """Rows the task loss averages over: one per non-pad token for LM data, else one per example."""
    if d.kind == "lm":
        return sum(len(d.items[k]) for k in idx)
    return len(idx)


def split(idx: list[int], tokens: list[int], max_tokens: int) -> list[list[int]]:
    """`idx` in order, in chunks whose longest example times their size is at most `max_tokens`
    (at least one example each)."""
    out: list[list[int]] = []
    cur: list[int] = []
    longest = 0
    for k, n in zip(idx, tokens):
        wide = max(longest, n)
        if cur and wide * (len(cur) + 1) > max_tokens:
            out.append(cur)
            cur, wide = [], n
        cur.append(k)
        longest = wide
    if cur:
        out.append(cur)
    return out


def chunks(d: TaskData, idx: list[int], max_tokens: int) -> list[tuple[list[int], float]]:
    """(chunk, weight) pairs for one task's batch; the weights are the chunks' shares of its rows.
    One chunk covering the batch has weight 1.0."""
    parts = split(idx, example_tokens(d, idx), max_tokens)
    if len(parts) == 1:
        return [(parts[0], 1.0)]
    total = loss_rows(d, idx)
    return [(p, loss_rows(d, p) / total) for p in parts]
