"""A mixture of experts built as a Merge-tab job: `mergecore.moe.build.build_moe` (the call
`mergecore moe` makes) in the background, its progress as `moe.progress` events (the gates'
prompts, then the bytes written), cancelled through the job's token, and its result in the shape
the Merge tab, the merge history, Compare and Export read a merge's (`out_dir`, `bytes_written`,
`tensors`, `shards`, `seconds`).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

from mergecore.errors import MergeError
from mergecore.events import Event

from app.render import fmt_seconds
from app.state import human_bytes


@dataclass
class MoEOutcome:
    """A finished mixture, as a merge job's result reads."""

    out_dir: Path
    bytes_written: int
    tensors: int
    shards: int
    seconds: float
    line: str  # the engine's summary (`MoEResult.summary`)
    warnings: list[str] = field(default_factory=list)

    def summary(self) -> str:
        return self.line


def _counts(out: Path) -> tuple[int, int]:
    """(tensors, shards) of the safetensors checkpoint in `out`."""
    from safetensors import safe_open

    shards = sorted(out.glob("*.safetensors"))
    tensors = 0
    for shard in shards:
        with safe_open(str(shard), framework="pt") as f:
            tensors += len(list(f.keys()))
    return tensors, len(shards)


def run_moe(jc: Any, config: Any, out_dir: Path, device: str = "cpu") -> MoEOutcome:
    """The job: `build_moe(config, out_dir)` with the job's cancel token; each tenth of each stage
    and the engine's warnings and summary go to the job's log."""
    from mergecore.moe.build import MoEProgress, build_moe

    shared = " + 1 shared" if config.shared_experts else ""
    jc.log(f"building a mixture of {len(config.experts)} experts{shared} ({config.experts_per_token} per token, "
           f"{config.gate_mode} gates) on {config.base_model} ...")
    start, last = time.monotonic(), {"": -1}

    def progress(p: MoEProgress) -> None:
        frac = p.done / p.total if p.total else 1.0
        data: dict[str, Any] = {"stage": p.stage, "done": p.done, "total": p.total, "fraction": frac,
                                "elapsed": time.monotonic() - start, "current": p.current}
        if p.stage == "writing":
            data.update(bytes_done=p.done, bytes_total=p.total)
        jc.emit(Event("moe.progress", data))
        tenth = int(frac * 10)
        if last.get(p.stage) != tenth:
            last[p.stage] = tenth
            jc.log(f"gates: {p.done}/{p.total} prompts" if p.stage == "gates" else
                   f"writing: {human_bytes(p.done)} of {human_bytes(p.total)}")

    res = build_moe(config, out_dir, device=device, progress=progress, cancel=jc.cancel)
    for w in res.warnings:
        jc.log(f"warning: {w}")
    jc.log(res.summary())
    tensors, shards = _counts(res.out)
    return MoEOutcome(res.out, res.bytes, tensors, shards, res.seconds, res.summary(), list(res.warnings))


def progress_text(p: dict[str, Any], status: str, elapsed: float) -> tuple[Optional[float], str]:
    """(fraction, line) of the progress bar from the latest `moe.progress` event."""
    if p.get("stage") == "gates":
        text = f"gates: {p['done']}/{p['total']} prompts through the base"
    else:
        text = f"writing: {human_bytes(p.get('done', 0))} / {human_bytes(p.get('total', 0))}"
    return p.get("fraction"), f"{text} · {fmt_seconds(p.get('elapsed', elapsed))} elapsed"


def done_text(res: MoEOutcome) -> str:
    """The Merge tab's summary of a built mixture."""
    arch = ""
    try:
        arch = json.loads((Path(res.out_dir) / "config.json").read_text())["architectures"][0] + ", "
    except (OSError, ValueError, KeyError, IndexError, TypeError):
        pass
    warned = "".join(f"\n- ⚠ {w}" for w in res.warnings)
    return (f"**Built** the mixture of experts in {fmt_seconds(res.seconds)}: {arch}{res.tensors} tensors, "
            f"{human_bytes(res.bytes_written)} in {res.shards} shard{'s' if res.shards != 1 else ''}, written to "
            f"`{res.out_dir}`{warned}")


def checked_config(text: Optional[str], roots: Sequence[Path], name: str, dtype: Optional[str] = None):
    """A history record's mixture config, parsed as data, its local models inside the folders the
    app may read (as an imported config's are); `dtype` (the Merge tab's) replaces its dtype."""
    from mergecore.moe.config import parse_moe_config

    from app.paths import local_sides

    if not text:
        raise MergeError(f"`{name}` has no config recorded")
    config = parse_moe_config(text, f"the config of {name}")
    for ref in config.referenced_models():
        local_sides(ref, roots)  # a local folder outside them: one line; a Hub id: fetched by the build
    return with_dtype(config, dtype)


def with_dtype(config: Any, dtype: Optional[str]):
    """The config with the Merge tab's output dtype (`as in recipe`: its own)."""
    if dtype in (None, "", "as in recipe"):
        return config
    from mergecore.moe.config import moe_config_from_dict

    return moe_config_from_dict({**config.model_dump(exclude_none=True), "dtype": dtype})
