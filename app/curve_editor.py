"""A per-layer curve editor: a `gr.HTML` component whose points the user drags.

The value is the list of anchors (floats). Anchors are spread evenly over the layer axis, as in
mergekit (`t = layer / (layers - 1)`); the editor also draws the value every layer actually gets
(linear interpolation, the same as `mergecore.params.interpolate`), reference lines at 0 and 1
labelled with what they mean (`label_low`, `label_high`), and the current value next to the
point being dragged.

Dragging redraws in the browser only; when the pointer is released the new anchors become the
component's value and the custom `edit` event fires, so Python listens with `editor.edit(...)`
(programmatic updates from Python do not fire `edit`, so there are no loops).
"""

from __future__ import annotations

from typing import Any

import gradio as gr

_TEMPLATE = """
<div class="ce-wrap">
  <div class="ce-title">${title || ''}</div>
  <svg class="ce-svg" viewBox="0 0 640 260" preserveAspectRatio="xMidYMid meet"
       role="img" aria-label="curve editor"></svg>
  <div class="ce-readout"></div>
</div>
"""

_CSS = """
.ce-wrap { border: 1px solid var(--border-color-primary); border-radius: var(--radius-lg);
           padding: 6px 8px; background: var(--block-background-fill); user-select: none; }
.ce-title { font-size: var(--text-sm); color: var(--body-text-color-subdued); min-height: 1em; }
.ce-svg { width: 100%; height: auto; touch-action: none; display: block; }
.ce-svg .ce-anchor { cursor: ns-resize; }
.ce-svg .ce-anchor:hover, .ce-svg .ce-anchor.ce-active { stroke-width: 4; }
.ce-readout { font-family: var(--font-mono); font-size: var(--text-sm); color: var(--body-text-color-subdued);
              white-space: nowrap; overflow-x: auto; }
"""

_JS = r"""
const svg = element.querySelector('.ce-svg');
const readout = element.querySelector('.ce-readout');
const W = 640, H = 260, L = 60, R = 16, T = 14, B = 36;
let anchors = null;     // the anchors shown (a copy while dragging)
let dragging = -1;

function num(v, d) { const x = Number(v); return Number.isFinite(x) ? x : d; }
function fmt(v) { return (Math.abs(v) >= 100 || v === 0) ? v.toFixed(0) : Number(v.toPrecision(3)).toString(); }
function current() {
  const v = Array.isArray(props.value) ? props.value.map(Number) : [];
  return v.length ? v : [0.5, 0.5];
}
function range() {
  let lo = num(props.y_min, 0), hi = num(props.y_max, 1);
  if (!(hi > lo)) { hi = lo + 1; }
  return [lo, hi];
}
function sx(t) { return L + t * (W - L - R); }
function sy(v) { const [lo, hi] = range(); return T + (1 - (v - lo) / (hi - lo)) * (H - T - B); }
function vy(y) { const [lo, hi] = range(); return lo + (1 - (y - T) / (H - T - B)) * (hi - lo); }
function interp(a, t) {
  if (a.length === 1) return a[0];
  const s = Math.min(Math.max(t, 0), 1) * (a.length - 1);
  const lo = Math.floor(s), hi = Math.min(lo + 1, a.length - 1), f = s - lo;
  return a[lo] * (1 - f) + a[hi] * f;
}
function esc(s) { return String(s ?? '').replace(/[&<>"]/g, c => ({'&':'&amp;','<':'&lt;','>':'&gt;','"':'&quot;'}[c])); }

function draw() {
  const a = anchors || current();
  const n = Math.max(1, Math.round(num(props.layers, 1)));
  const [lo, hi] = range();
  const color = props.color || 'var(--color-accent)';
  let s = '';
  // grid and reference lines
  const ticks = 4;
  for (let i = 0; i <= ticks; i++) {
    const v = lo + (hi - lo) * i / ticks, y = sy(v);
    s += `<line x1="${L}" x2="${W - R}" y1="${y}" y2="${y}" stroke="var(--border-color-primary)" stroke-width="1"/>`;
    s += `<text x="${L - 14}" y="${y + 4}" text-anchor="end" font-size="11" fill="var(--body-text-color-subdued)">${fmt(v)}</text>`;
  }
  const refs = [[0, props.label_low], [1, props.label_high]];
  for (const [v, label] of refs) {
    if (v < lo || v > hi) continue;
    const y = sy(v);
    s += `<line x1="${L}" x2="${W - R}" y1="${y}" y2="${y}" stroke="var(--body-text-color-subdued)" stroke-dasharray="4 3" stroke-width="1"/>`;
    if (label) s += `<text class="ce-ref" x="${W - R - 4}" y="${y - 5}" text-anchor="end" font-size="11" fill="var(--body-text-color-subdued)">${esc(label)}</text>`;
  }
  // layer axis
  const step = n <= 16 ? 1 : Math.ceil(n / 16);
  for (let l = 0; l < n; l += step) {
    const x = sx(n > 1 ? l / (n - 1) : 0);
    s += `<text x="${x}" y="${H - B + 16}" text-anchor="middle" font-size="11" fill="var(--body-text-color-subdued)">${l}</text>`;
  }
  s += `<text x="${(L + W - R) / 2}" y="${H - 4}" text-anchor="middle" font-size="11" fill="var(--body-text-color-subdued)">layer</text>`;
  // the curve through the anchors and the value each layer gets
  const pts = a.map((v, i) => `${sx(a.length > 1 ? i / (a.length - 1) : 0.5)},${sy(v)}`).join(' ');
  s += `<polyline points="${pts}" fill="none" stroke="${color}" stroke-width="2" opacity="0.5"/>`;
  const per = [];
  for (let l = 0; l < n; l++) {
    const t = n > 1 ? l / (n - 1) : 1;
    const v = interp(a, t);
    per.push(v);
    s += `<rect class="ce-layer" x="${sx(t) - 3}" y="${sy(v) - 3}" width="6" height="6" fill="var(--body-text-color)" opacity="0.65"><title>layer ${l}: ${fmt(v)}</title></rect>`;
  }
  a.forEach((v, i) => {
    const x = sx(a.length > 1 ? i / (a.length - 1) : 0.5), y = sy(v);
    s += `<circle class="ce-anchor${i === dragging ? ' ce-active' : ''}" data-anchor="${i}" cx="${x}" cy="${y}" r="9"
            fill="var(--background-fill-primary)" stroke="${color}" stroke-width="3"><title>anchor ${i}: ${fmt(v)}</title></circle>`;
    if (i === dragging) s += `<text x="${x}" y="${y - 14}" text-anchor="middle" font-size="13" font-weight="bold" fill="${color}">${fmt(v)}</text>`;
  });
  svg.innerHTML = s;
  readout.textContent = 'per layer: ' + per.map(fmt).join(', ');
}

function toSvgY(ev) {
  const m = svg.getScreenCTM();
  if (!m) return null;
  const p = svg.createSVGPoint();
  p.x = ev.clientX; p.y = ev.clientY;
  return p.matrixTransform(m.inverse()).y;
}

svg.addEventListener('pointerdown', (ev) => {
  const target = ev.target.closest ? ev.target.closest('.ce-anchor') : null;
  if (!target) return;
  ev.preventDefault();
  dragging = Number(target.dataset.anchor);
  anchors = current().slice();
  svg.setPointerCapture(ev.pointerId);
  draw();
});
svg.addEventListener('pointermove', (ev) => {
  if (dragging < 0) return;
  const y = toSvgY(ev);
  if (y === null) return;
  const [lo, hi] = range();
  let v = Math.min(hi, Math.max(lo, vy(y)));
  const snap = num(props.snap, 0);
  v = snap > 0 ? Math.round(v / snap) * snap : Math.round(v * 1000) / 1000;
  anchors[dragging] = v;
  draw();
});
function finish(ev) {
  if (dragging < 0) return;
  dragging = -1;
  try { svg.releasePointerCapture(ev.pointerId); } catch (e) {}
  const a = anchors;
  anchors = null;
  props.value = a.slice();
  draw();
  trigger('edit', { anchors: a.slice() });
}
svg.addEventListener('pointerup', finish);
svg.addEventListener('pointercancel', finish);
// prop names are listed in one string: a quoted prop name would read as a custom event name to gr.HTML
watch('value layers y_min y_max label_low label_high title color snap'.split(' '), () => { if (dragging < 0) draw(); });
draw();
"""


class CurveEditor(gr.HTML):
    """Drag points of a per-layer curve. Value: the anchors (list of floats)."""

    def __init__(self, value: list[float] | None = None, *, layers: int = 8, y_min: float = 0.0,
                 y_max: float = 1.0, label_low: str = "", label_high: str = "", title: str = "",
                 snap: float = 0.0, color: str = "", **kwargs: Any):
        super().__init__(
            value=list(value) if value is not None else [0.5, 0.5],
            html_template=_TEMPLATE,
            css_template=_CSS,
            js_on_load=_JS,
            layers=layers,
            y_min=y_min,
            y_max=y_max,
            label_low=label_low,
            label_high=label_high,
            title=title,
            snap=snap,
            color=color,
            **kwargs,
        )

    def preprocess(self, payload: Any) -> list[float] | None:
        if payload is None:
            return None
        if isinstance(payload, str):  # tolerate "0.1, 0.5" from API callers
            payload = [p for p in payload.replace("[", "").replace("]", "").split(",") if p.strip()]
        if not isinstance(payload, (list, tuple)):
            raise gr.Error("curve editor: expected a list of numbers")
        try:
            return [float(v) for v in payload]
        except (TypeError, ValueError):
            raise gr.Error("curve editor: expected a list of numbers") from None

    def postprocess(self, value: Any) -> list[float] | None:
        if value is None:
            return None
        return [float(v) for v in value]

    def api_info(self) -> dict[str, Any]:
        return {"type": "array", "items": {"type": "number"}, "title": "Curve anchors"}

    def example_payload(self) -> Any:
        return [0.0, 0.5, 1.0]

    def example_value(self) -> Any:
        return [0.0, 0.5, 1.0]
