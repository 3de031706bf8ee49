"""Live plots from job events: long-format tables for `gr.LinePlot`.

Every job reports `mergecore.events.Event`s (`kind`, `data`, `time`); a plot picks the events of
one kind and some numeric fields of their data. The Merge tab plots bytes written over time from
`merge.progress`; a search plots its reward, loss and best-so-far from its own events the same
way (`events_frame(events, "rmm.episode", x="episode", ys=["reward", "best"])`, plotted with
`color="series"`; give such a plot its series names from the start, since a `gr.LinePlot` created
empty does not draw series that appear later).
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

COLUMNS = ["x", "value", "series"]


def events_frame(events: Sequence[dict[str, Any]], kind: str, x: str, ys: Sequence[str], *,
                 scale: Optional[dict[str, float]] = None, names: Optional[dict[str, str]] = None,
                 max_points: int = 500, x_fn: Optional[Callable[[dict[str, Any]], float]] = None):
    """A long-format DataFrame (x, value, series) of `ys` against `x` for events of `kind`.

    `events` are `Event.as_dict()` dicts (as in `JobManager.snapshot`). Long histories are
    thinned to about `max_points` per series, always keeping the last point.
    """
    import pandas as pd

    scale = scale or {}
    names = names or {}
    picked = [e for e in events if e.get("kind") == kind]
    if len(picked) > max_points:
        step = len(picked) / max_points
        picked = [picked[int(i * step)] for i in range(max_points)] + [picked[-1]]
    rows = []
    for e in picked:
        d = e.get("data") or {}
        xv = x_fn(e) if x_fn else d.get(x)
        if xv is None:
            continue
        for y in ys:
            v = d.get(y)
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                rows.append((float(xv), float(v) * scale.get(y, 1.0), names.get(y, y)))
    return pd.DataFrame(rows, columns=COLUMNS).astype({"x": "float64", "value": "float64", "series": "str"})


def merge_frame(events: Sequence[dict[str, Any]]):
    """MB written against seconds elapsed, from a merge job's progress events."""
    return events_frame(events, "merge.progress", "elapsed", ["bytes_done"], scale={"bytes_done": 1e-6},
                        names={"bytes_done": "MB written"})
