"""Live plots from job events: long-format tables for `gr.LinePlot`, and plotly figures.

Every job reports `mergecore.events.Event`s (`kind`, `data`, `time`); a plot picks the events of
one kind and some numeric fields of their data. The Merge tab plots bytes written over time from
`merge.progress`; a search plots its reward, loss and best-so-far from its own events the same
way (`events_frame(events, "rmm.episode", x="episode", ys=["reward", "best"])`, plotted with
`color="series"`; give such a plot its series names from the start, since a `gr.LinePlot` created
empty does not draw series that appear later).

The Search tab draws plotly figures (`gr.Plot`): `line_figure` (several named series against
one x), `heatmap_figure` (e.g. a merging map, layers x actions) and `empty_figure` (a titled
placeholder before the first event). Each search maps its events to figures with these (see
`app.searches`).
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
    """MB written against seconds elapsed, from a merge job's progress events (a mixture of
    experts' `moe.progress`: those of its writing stage)."""
    kind = "moe.progress" if any(e.get("kind") == "moe.progress" for e in events) else "merge.progress"
    return events_frame(events, kind, "elapsed", ["bytes_done"], scale={"bytes_done": 1e-6},
                        names={"bytes_done": "MB written"})


# ---------------------------------------------------------------------------------------------
# plotly figures (the Search tab)

PLOT_HEIGHT = 320
PALETTE = ["#2563eb", "#f97316", "#16a34a", "#dc2626", "#9333ea", "#0891b2", "#ca8a04", "#db2777"]


def _layout(fig, title: str, x_title: str = "", y_title: str = "", height: int = PLOT_HEIGHT):
    fig.update_layout(
        title={"text": title, "x": 0.01, "xanchor": "left", "font": {"size": 14}},
        template="plotly_white", height=height, margin={"l": 55, "r": 15, "t": 36, "b": 75},
        legend={"orientation": "h", "yanchor": "top", "y": -0.2, "xanchor": "left", "x": 0.0, "font": {"size": 11}},
        xaxis_title=x_title, yaxis_title=y_title, uirevision="keep",
    )
    return fig


def empty_figure(title: str, message: str = "waiting for the first events ...", height: int = PLOT_HEIGHT):
    import plotly.graph_objects as go

    fig = go.Figure()
    fig.add_annotation(text=message, showarrow=False, x=0.5, y=0.5, xref="paper", yref="paper",
                       font={"size": 13, "color": "#6b7280"})
    fig.update_xaxes(visible=False)
    fig.update_yaxes(visible=False)
    return _layout(fig, title, height=height)


def line_figure(title: str, series: Sequence[dict[str, Any]], *, x_title: str = "", y_title: str = "",
                height: int = PLOT_HEIGHT, max_points: int = 1000):
    """Series are dicts: name, x, y, and optionally mode ('lines', 'markers', 'lines+markers'),
    dash, color, width, opacity, kind ('scatter' or 'bar'). Long series are thinned."""
    import plotly.graph_objects as go

    fig = go.Figure()
    for i, s in enumerate(series):
        x, y = list(s["x"]), list(s["y"])
        if len(x) > max_points:
            step = len(x) / max_points
            keep = sorted({int(j * step) for j in range(max_points)} | {len(x) - 1})
            x, y = [x[j] for j in keep], [y[j] for j in keep]
        color = s.get("color") or PALETTE[i % len(PALETTE)]
        if s.get("kind") == "bar":
            fig.add_trace(go.Bar(x=x, y=y, name=s["name"], marker_color=color, opacity=s.get("opacity", 0.8)))
        else:
            fig.add_trace(go.Scatter(x=x, y=y, name=s["name"], mode=s.get("mode", "lines"),
                                     line={"color": color, "dash": s.get("dash", "solid"), "width": s.get("width", 2)},
                                     marker={"size": s.get("size", 5), "color": color}, opacity=s.get("opacity", 1.0)))
    return _layout(fig, title, x_title, y_title, height)


def heatmap_figure(title: str, z: Sequence[Sequence[float]], x_labels: Sequence[Any], y_labels: Sequence[str], *,
                   x_title: str = "", y_title: str = "", height: int = PLOT_HEIGHT, colorscale: str = "Blues",
                   text: Optional[Sequence[Sequence[str]]] = None):
    import plotly.graph_objects as go

    fig = go.Figure(go.Heatmap(z=[list(r) for r in z], x=list(x_labels), y=list(y_labels), colorscale=colorscale,
                               showscale=False, xgap=2, ygap=2, zmin=0,
                               text=[list(r) for r in text] if text is not None else None,
                               texttemplate="%{text}" if text is not None else None,
                               hovertemplate="%{y} at %{x}<extra></extra>"))
    fig.update_yaxes(autorange="reversed")
    fig.update_xaxes(type="category")
    return _layout(fig, title, x_title, y_title, height)
