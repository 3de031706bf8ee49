"""What a leaderboard writes besides the program's recipe.yml / result.json: leaderboard.csv (one
row per scored candidate, ranked by validation) and leaderboard.html (a self-contained plotly
chart, no network needed to view it). Both are written to a temporary file and renamed, so a
crash or Ctrl-C never leaves half a file.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any, Optional

from mergecore.search.checkpoint import write_text_atomic as atomic_write

CSV_FILE = "leaderboard.csv"
HTML_FILE = "leaderboard.html"


def _num(v: Optional[float]) -> str:
    return "" if v is None else f"{v:.6f}"


def table(rows: list[dict[str, Any]], tests: dict[str, dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    """The CSV's header and rows: rank, label, method, params (JSON), phase, validation mean and
    per task, test mean and per task (top K only; empty otherwise), seconds."""
    val_tasks = list(dict.fromkeys(t for r in rows for t in r["val_scores"]))
    test_tasks = list(dict.fromkeys(t for r in tests.values() for t in r["test_scores"]))
    header = (["rank", "label", "method", "params", "phase", "val_mean"] + [f"val_{t}" for t in val_tasks]
              + ["test_mean"] + [f"test_{t}" for t in test_tasks] + ["seconds"])
    out = []
    for i, r in enumerate(rows, 1):
        t = tests.get(r["key"])
        out.append([str(i), r["label"], r["method"], json.dumps(r["params"], sort_keys=True), r["phase"],
                    _num(r["val_mean"])] + [_num(r["val_scores"].get(k)) for k in val_tasks]
                   + [_num(t["test_mean"] if t else None)]
                   + [_num(t["test_scores"].get(k) if t else None) for k in test_tasks] + [f"{r['seconds']:.2f}"])
    return header, out


def write_csv(path: Path, rows: list[dict[str, Any]], tests: dict[str, dict[str, Any]]) -> None:
    header, body = table(rows, tests)
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    w.writerows(body)
    atomic_write(path, buf.getvalue())


def figure(rows: list[dict[str, Any]], tests: dict[str, dict[str, Any]], title: str = "leaderboard"):
    """A plotly figure: validation mean of every candidate (best at the top), coloured by phase,
    with the test mean of the top K as markers."""
    import plotly.graph_objects as go

    shown = list(reversed(rows))  # plotly draws the first category at the bottom
    labels = [f"{len(rows) - i}. {r['label']}" for i, r in enumerate(shown)]
    fig = go.Figure()
    for phase, colour in (("data-free", "#4C78A8"), ("search", "#F58518")):
        pick = [i for i, r in enumerate(shown) if r["phase"] == phase]
        if pick:
            fig.add_trace(go.Bar(x=[shown[i]["val_mean"] for i in pick], y=[labels[i] for i in pick],
                                 orientation="h", name=f"validation ({phase})", marker_color=colour))
    pick = [i for i, r in enumerate(shown) if r["key"] in tests]
    if pick:
        fig.add_trace(go.Scatter(x=[tests[shown[i]["key"]]["test_mean"] for i in pick], y=[labels[i] for i in pick],
                                 mode="markers", name="test (top K)", marker={"color": "#E45756", "size": 11,
                                                                              "symbol": "diamond"}))
    lo = min([r["val_mean"] for r in rows] + [t["test_mean"] for t in tests.values()], default=0.0)
    fig.update_layout(title=title, xaxis_title="mean score", barmode="overlay", height=max(320, 22 * len(rows) + 120),
                      yaxis={"categoryorder": "array", "categoryarray": labels}, legend={"orientation": "h"})
    fig.update_xaxes(range=[max(0.0, lo - 0.05), None])
    return fig


def write_html(path: Path, rows: list[dict[str, Any]], tests: dict[str, dict[str, Any]], title: str) -> None:
    fig = figure(rows, tests, title)
    atomic_write(path, fig.to_html(include_plotlyjs=True, full_html=True))
