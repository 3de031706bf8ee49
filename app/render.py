"""Small renderers the tabs share: the progress bar, durations, error lines, the page's CSS."""

from __future__ import annotations

import html
from typing import Any, Optional

from app.compare import CSS as COMPARE_CSS


def progress_html(fraction: Optional[float], text: str, status: str = "running") -> str:
    pct = 0.0 if fraction is None else max(0.0, min(1.0, fraction)) * 100
    color = {"failed": "#dc2626", "cancelled": "#9ca3af", "done": "#16a34a"}.get(status, "var(--color-accent)")
    return (f'<div class="mc-progress" data-status="{status}"><div class="mc-bar"><div style="width:{pct:.1f}%;'
            f'background:{color}"></div></div><div class="mc-progress-text">{html.escape(str(text))}</div></div>')


def fmt_seconds(s: Optional[float]) -> str:
    if s is None:
        return "?"
    if s < 60:
        return f"{s:.1f} s"
    return f"{int(s // 60)} min {int(s % 60):02d} s"


def error_md(err: Any) -> str:
    return f"**Error:** {err}"


def notes_md(first: str, notes: list[str]) -> str:
    return first + "".join(f"\n- {n}" for n in notes)


CSS = """
.mc-progress { margin: 4px 0 8px 0; }
.mc-bar { height: 14px; background: var(--neutral-200); border-radius: 7px; overflow: hidden; }
.mc-bar > div { height: 100%; transition: width 0.3s; }
.mc-progress-text { font-family: var(--font-mono); font-size: 13px; margin-top: 3px; }
.mc-synthetic { background: #fef3c7; color: #92400e; padding: 2px 8px; border-radius: 8px; font-weight: 600; }
.mc-field-row { align-items: end !important; }
.mc-curve-btn { max-width: 90px !important; min-width: 60px !important; }
.mc-field-error .info-text { color: var(--error-text-color, #b91c1c) !important; font-weight: 600; }
.mc-field-error textarea, .mc-field-error input[type=text] { border-color: var(--error-border-color, #dc2626) !important; }
.mc-real { background: #dcfce7; color: #166534; padding: 2px 8px; border-radius: 8px; font-weight: 600; }
footer { display: none !important; }
""" + COMPARE_CSS
