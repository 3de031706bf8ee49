"""`extract_lora`: a fine-tune minus its base, as a PEFT LoRA adapter that peft loads.

Streams tensor by tensor through the models' lazy sources: each selected linear weight's
difference ΔW = W_ft − W_base is truncated by SVD into B·A (`factor.py`: rank, energy, exact or
randomized); every other tensor that changed (norms, biases, embeddings, heads, linear layers
left out of `modules`) is kept whole in `modules_to_save`, so the adapter on the base gives back
the fine-tune up to the truncation. Unchanged tensors are left out. The adapter's config is
written by peft's own `LoraConfig` (`lora_alpha = r` and per-layer `alpha_pattern = rank_pattern`:
a scale of 1 everywhere); its tensors under the names peft saves them by. A per-tensor report
(rank, retained energy, relative Frobenius error) is returned and saved as extract_report.csv.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Optional, Sequence

import torch

from mergecore.errors import MergeError, clip
from mergecore.events import CancelToken, MergeProgress, ProgressCallback
from mergecore.io.adapter import AdapterSource, open_source
from mergecore.io.lora_config import split_adapter_ref
from mergecore.io.outdir import existing_dirs
from mergecore.io.source import ModelSource, dtype_from_name
from mergecore.lora.factor import LowRank, check_device, check_rank, factorize
from mergecore.lora.output import AdapterFolder, Entry, write_safetensors
from mergecore.lora.plan import ExtractPlan, compact_targets, module_of, plan_extraction
from mergecore.lora.report import Row, RowsReport

if TYPE_CHECKING:
    from peft import LoraConfig

PREFIX = "base_model.model."  # peft's prefix of every key in adapter_model.safetensors
REPORT = "extract_report.csv"


@dataclass
class ExtractReport(RowsReport):
    """What `extract_lora` wrote: the rows, the config's choices, sizes and time."""

    out: Path
    rows: list[Row]
    r: int
    target_modules: list[str]
    modules_to_save: list[str]
    unchanged: int
    bytes: int
    seconds: float
    warnings: list[str] = field(default_factory=list)

    def summary(self) -> str:
        return (f"wrote {self.out}: {len(self.lora)} layers as LoRA ({self.rank_span()}, r={self.r}), "
                f"{len(self.modules_to_save)} modules kept whole, {self.unchanged} tensors unchanged; "
                f"{self.energy_text()}; {self.bytes / 2**20:.1f} MiB in {self.seconds:.1f}s")


def _check_args(rank: Optional[int], energy: Optional[float], device: str) -> torch.device:
    if rank is None and energy is None:
        raise MergeError("give --rank R, --energy E or both")
    check_rank(rank, energy)
    return check_device(device)


def _changed(a: torch.Tensor, b: torch.Tensor) -> bool:
    return not (torch.equal(a, b) if a.dtype == b.dtype else torch.equal(a.float(), b.float()))


def _stream(ft: ModelSource, base: ModelSource, plan: ExtractPlan, *, rank: Optional[int], energy: Optional[float],
            device: torch.device, dtype: torch.dtype, progress: Optional[ProgressCallback],
            cancel: Optional[CancelToken]) -> tuple[dict[str, LowRank], set[str], set[str], int]:
    """Read each tensor pair once: (factors by module, changed biases of selected modules, modules
    kept whole, unchanged tensor count)."""
    selected = set(plan.selected)
    factors: dict[str, LowRank] = {}
    biases: set[str] = set()
    full: set[str] = set()
    unchanged = 0
    names = list(ft.tensors)
    total, done, start = ft.total_bytes(), 0, time.monotonic()
    for i, name in enumerate(names):
        if cancel is not None:
            cancel.check()
        module, leaf = module_of(name), name.rpartition(".")[2]
        a, b = ft.read(name), base.read(name)
        if module in selected and leaf == "weight":
            delta = a.to(device, torch.float32) - b.to(device, torch.float32)
            del a, b
            if plan.fan_in_fan_out:
                delta = delta.T
            if not bool(torch.isfinite(delta).all()):
                raise MergeError(f"tensor '{clip(name, 200)}': the difference of --model and --base is not finite "
                                 f"(inf or NaN in a model)")
            if bool(delta.any()):
                factors[module] = factorize(delta, rank=rank, energy=energy, name=name, dtype=dtype)
            else:
                unchanged += 1
            del delta
        elif not _changed(a, b):
            unchanged += 1
        elif module in selected and leaf == "bias":
            biases.add(module)
        else:
            full.add(module)
        done += ft.info(name).nbytes
        if progress is not None:
            progress(MergeProgress(i + 1, len(names), done, total, time.monotonic() - start, name))
    full |= biases - factors.keys()  # a layer whose weight is the base's but whose bias changed: kept whole
    return factors, biases & factors.keys(), full, unchanged


def _layout(ft: ModelSource, plan: ExtractPlan, factors: dict[str, LowRank], bias: bool, full: set[str],
            full_dtype: Optional[torch.dtype]) -> tuple[list[Entry], list[Row]]:
    """The adapter's tensors under peft's names, and the report's rows, in checkpoint order."""
    entries: list[Entry] = []
    rows: list[Row] = []

    def keep(name: str, key: str) -> Entry:
        info = ft.info(name)
        return (key, full_dtype or info.dtype, info.shape, lambda: ft.read(name))

    for name in ft.tensors:
        module, leaf = module_of(name), name.rpartition(".")[2]
        if module in factors and leaf == "weight":
            f = factors[module]
            entries.append((f"{PREFIX}{module}.lora_A.weight", f.a.dtype, tuple(f.a.shape), lambda f=f: f.a))
            entries.append((f"{PREFIX}{module}.lora_B.weight", f.b.dtype, tuple(f.b.shape), lambda f=f: f.b))
            rows.append(Row(name, "lora", ft.info(name).shape, f.rank, f.energy, f.error, f.method))
        elif module in factors and leaf == "bias" and bias:  # peft saves every targeted layer's bias
            entries.append(keep(name, f"{PREFIX}{module}.base_layer.bias"))
            rows.append(Row(name, "bias", ft.info(name).shape))
        elif module in full:
            entries.append(keep(name, f"{PREFIX}{name}"))
            rows.append(Row(name, "full", ft.info(name).shape))
            if module == plan.embedding and leaf == "weight" and plan.tied_head:
                # the tied head: under its own name too (peft saves and loads it so with ensure_weight_tying,
                # and it is a module to save of its own where peft cannot tie it)
                entries.append(keep(name, f"{PREFIX}{plan.tied_head}.weight"))
    return sorted(entries, key=lambda e: e[0]), rows


def _config(plan: ExtractPlan, factors: dict[str, LowRank], bias: bool, full: set[str], base_ref: str,
            all_modules: Sequence[str]) -> "LoraConfig":
    """peft's LoraConfig for the adapter: r is the most common rank, the others in rank_pattern
    (and alpha_pattern, so that α/r = 1 for every layer)."""
    from peft import LoraConfig

    counts = Counter(f.rank for f in factors.values())
    r = max(counts, key=lambda k: (counts[k], k))
    pattern = {m: f.rank for m, f in factors.items() if f.rank != r}
    tied = plan.embedding in full and plan.tied_head is not None
    if tied:  # named too, so that peft finds the tie by the head's name (it knows `lm_head`, not `wte`)
        full = full | {str(plan.tied_head)}
    return LoraConfig(r=r, lora_alpha=r, rank_pattern=pattern, alpha_pattern=dict(pattern), lora_dropout=0.0,
                      target_modules=compact_targets(list(factors), all_modules),
                      modules_to_save=sorted(full) or None, bias="lora_only" if bias else "none",
                      fan_in_fan_out=plan.fan_in_fan_out, ensure_weight_tying=tied,
                      task_type="CAUSAL_LM" if plan.causal_lm else None, base_model_name_or_path=base_ref,
                      inference_mode=True)


def extract_lora(model: str, base: str, out: str | Path, *, rank: Optional[int] = None,
                 energy: Optional[float] = None, modules: Optional[Sequence[str]] = None,
                 dtype: Optional[str] = None, device: str = "cpu", overwrite: bool = False,
                 progress: Optional[ProgressCallback] = None, cancel: Optional[CancelToken] = None,
                 search_dirs: tuple[Path, ...] = ()) -> ExtractReport:
    """Extract `model` − `base` as a LoRA adapter in `out` (written atomically: nothing is left
    there on failure or cancel) and return the report.

    `rank` caps every layer's rank; `energy` picks per layer the smallest rank keeping that share
    of ΔW's squared singular values (at most `rank` when both are given). `modules`: linear module
    names to factorise (default: every linear layer of the layer stacks). `dtype`: of the saved
    tensors (default: factors in float32, whole modules in the fine-tune's own dtype). `overwrite`
    replaces a folder an earlier extraction wrote. Raises `MergeError` (one line) on bad input
    and `Cancelled` when `cancel` is set.
    """
    start = time.monotonic()
    dev = _check_args(rank, energy, device)
    out_dtype = dtype_from_name(dtype) if dtype else None
    refs = [side for ref in (model, base) for side in (split_adapter_ref(ref, search_dirs) or (ref,))]
    local = existing_dirs(p for ref in refs for p in (ref, *(d / ref for d in search_dirs)))
    AdapterFolder(out, overwrite=overwrite, sources=local)  # a bad OUT fails before any model is fetched
    ft = open_source(model, search_dirs)  # BASE+ADAPTER works too: an adapter re-extracted at another rank
    bs = open_source(base, search_dirs)
    try:
        folders = [f for s in (ft, bs) for f in (s.path, *([s.adapter_path] if isinstance(s, AdapterSource) else []))]
        folder = AdapterFolder(out, overwrite=overwrite, sources=folders)
        plan = plan_extraction(ft, bs, modules)
        factors, biases, full, unchanged = _stream(ft, bs, plan, rank=rank, energy=energy, device=dev,
                                                   dtype=out_dtype or torch.float32, progress=progress, cancel=cancel)
        if not factors:
            if full:
                raise MergeError(f"no selected linear layer changed between --model and --base (only "
                                 f"{len(full)} other modules did, e.g. '{clip(sorted(full)[0], 120)}'); "
                                 f"a LoRA adapter needs at least one factorised layer")
            raise MergeError("--model and --base hold identical weights; there is nothing to extract")
        entries, rows = _layout(ft, plan, factors, bool(biases), full, out_dtype)
        config = _config(plan, factors, bool(biases), full, base, [module_of(n) for n in ft.tensors])
        with folder:
            tmp = folder.temp()
            config.save_pretrained(str(tmp))
            nbytes = write_safetensors(tmp / "adapter_model.safetensors", entries, cancel=cancel)
            report = ExtractReport(folder.out, rows, config.r, sorted(config.target_modules),
                                   list(config.modules_to_save or []), unchanged, nbytes, 0.0, folder.warnings)
            folder.check_alive()  # a signal handler may have removed the folder meanwhile
            (tmp / REPORT).write_text(report.csv())
            if cancel is not None:
                cancel.check()
            folder.publish()
    finally:
        ft.close()
        bs.close()
    report.seconds = time.monotonic() - start
    return report
