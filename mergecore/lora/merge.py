"""`merge_adapters`: several LoRA adapters of one base become one PEFT adapter that peft loads.

The adapters are opened against the base (`adapters.py`: checked, sorted into LoRA modules and
tensors kept whole), each LoRA module is merged as factors by the chosen method (`combine.py`:
cat, linear, knots, or a mergecore method on the full changes) and re-factorised to the rank
asked for, and the result is written atomically (`output.py`) with peft's own `LoraConfig`:
`lora_alpha = r` per module (scale 1: B·A is the merged change), every adapter's target modules
(their union), whole tensors in `modules_to_save`. A per-module report (rank, retained energy of
the re-factorisation, relative error) is returned and saved as merge_report.csv, the config as
run as merge_adapters.yml.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import torch
import yaml

from mergecore.errors import MergeError, clip
from mergecore.events import CancelToken, MergeProgress, ProgressCallback
from mergecore.io.outdir import existing_dirs
from mergecore.io.source import dtype_from_name
from mergecore.lora.adapters import MergeInputs, default_base, open_inputs
from mergecore.lora.combine import OWN_METHODS, Combiner, full_method
from mergecore.lora.factor import LowRank, check_device
from mergecore.lora.merge_config import CONFIG_FILE, AdapterMergeConfig, load_config, method_names
from mergecore.lora.output import MERGE_KIND, AdapterFolder, Entry, write_safetensors
from mergecore.lora.plan import compact_targets, module_of
from mergecore.lora.report import Row, RowsReport
from mergecore.methods import get_method

if TYPE_CHECKING:
    from peft import LoraConfig

PREFIX = "base_model.model."  # peft's prefix of every key in adapter_model.safetensors
REPORT = "merge_report.csv"
TIED_HEAD = "lm_head"  # the head transformers ties to the input embedding (saved as its twin)


@dataclass
class MergeAdaptersReport(RowsReport):
    """What `merge_adapters` wrote: the rows, the config's choices, sizes and time."""

    out: Path
    method: str
    rows: list[Row]
    r: int
    target_modules: list[str]
    modules_to_save: list[str]
    bytes: int
    seconds: float
    warnings: list[str] = field(default_factory=list)

    def summary(self) -> str:
        whole = sum(1 for r in self.rows if r.kind == "full")
        return (f"wrote {self.out}: {len(self.lora)} modules merged by {self.method} as LoRA ({self.rank_span()}, "
                f"r={self.r}), {whole} tensors kept whole; {self.energy_text()}; "
                f"{self.bytes / 2**20:.1f} MiB in {self.seconds:.1f}s")


def _combiner(config: AdapterMergeConfig, inputs: MergeInputs, dtype: torch.dtype,
              device: torch.device) -> tuple[Combiner, list[str]]:
    """The per-module merge of `config`, its method's parameters resolved and checked."""
    specs = inputs.specs
    weights = [s.weight for s in specs]
    per_adapter = [s.params for s in specs]
    warnings: list[str] = []
    inner, params = None, {}
    own_params = config.method in ("cat", "linear") or (config.method == "knots" and config.knots_merge == "linear")
    if own_params:
        given = {k for k in config.parameters} | {k for p in per_adapter for k in p}
        if given:
            warnings.append(f"method {config.method}{' (knots_merge linear)' if config.method == 'knots' else ''} "
                            f"takes no parameters; {', '.join(sorted(map(str, given)))} ignored")
    else:
        name = config.knots_merge if config.method == "knots" else config.method
        where = "knots_merge" if config.method == "knots" else "parameters"
        inner, params, found = full_method(name, len(specs), weights, config.parameters, per_adapter, where)
        warnings += found
    rank = config.rank
    if rank is None and config.energy is None and config.method not in ("cat", "linear"):
        rank = inputs.max_rank  # as peft's add_weighted_adapter does for its SVD methods
    return Combiner(config.method, inner, params, rank, config.energy, dtype, device, config.seed), warnings


def _check_method(config: AdapterMergeConfig) -> None:
    if config.method not in OWN_METHODS:
        try:
            get_method(config.method)
        except MergeError:
            raise MergeError(f"unknown method '{clip(config.method, 60)}'; use {method_names()}") from None
    if config.method == "knots" and config.knots_merge != "linear":
        try:
            get_method(config.knots_merge)
        except MergeError:
            raise MergeError(f"unknown knots_merge '{clip(config.knots_merge, 60)}'; use ties (the paper's), linear, "
                             f"or another mergecore method") from None


def _merge_modules(inputs: MergeInputs, combiner: Combiner, progress: Optional[ProgressCallback],
                   cancel: Optional[CancelToken]) -> dict[str, LowRank]:
    """Each LoRA module's merged factors (base weight -> LowRank); modules whose change merges to 0 left out."""
    factors: dict[str, LowRank] = {}
    names = list(inputs.lora)
    start = time.monotonic()
    for i, name in enumerate(names):
        if cancel is not None:
            cancel.check()
        merged = combiner.combine(name, inputs.terms(name))
        if merged is not None:
            factors[name] = merged
        if progress is not None:
            progress(MergeProgress(i + 1, len(names), i + 1, len(names), time.monotonic() - start, name))
    if not factors:
        raise MergeError(f"the adapters' changes merge to nothing with method {combiner.method} (every merged module "
                         f"is zero); check the weights and parameters")
    return factors


def _layout(inputs: MergeInputs, factors: dict[str, LowRank], whole_dtype: Optional[torch.dtype]
            ) -> tuple[list[Entry], list[Row], list[str], bool]:
    """The adapter's tensors under peft's names, the report's rows, the modules kept whole, and
    whether the head is tied to the embedding (saved as its twin, ensure_weight_tying)."""
    entries: list[Entry] = []
    rows: list[Row] = []
    base = inputs.base
    lora_modules = {module_of(n) for n in factors}
    whole = list(inputs.whole)
    for bias in inputs.biases:  # a changed bias whose layer merged to no change: kept whole with its layer
        if module_of(bias) not in lora_modules:
            whole += [n for n in base.tensors if module_of(n) == module_of(bias) and n not in whole]
    tied_emb = inputs.tied_embedding
    tied = False

    def merged(name: str, key: str) -> Entry:
        info = base.info(name)
        return (key, whole_dtype or info.dtype, info.shape, lambda: inputs.merged_whole(name))

    for name, f in factors.items():
        module = module_of(name)
        a_key, b_key = ((f"{module}.lora_embedding_A", f"{module}.lora_embedding_B") if inputs.lora[name]
                        else (f"{module}.lora_A.weight", f"{module}.lora_B.weight"))
        entries.append((PREFIX + a_key, f.a.dtype, tuple(f.a.shape), lambda f=f: f.a))
        entries.append((PREFIX + b_key, f.b.dtype, tuple(f.b.shape), lambda f=f: f.b))
        if name == tied_emb and inputs.lora[name]:  # peft's twin of a tied embedding's LoRA, on the head
            tied = True
            entries.append((f"{PREFIX}{TIED_HEAD}.lora_A.weight", f.b.dtype, tuple(f.b.T.shape), lambda f=f: f.b.T))
            entries.append((f"{PREFIX}{TIED_HEAD}.lora_B.weight", f.a.dtype, tuple(f.a.T.shape), lambda f=f: f.a.T))
        rows.append(Row(name, "lora", base.info(name).shape, f.rank, f.energy, f.error, f.method))
    for name in inputs.biases:
        if module_of(name) in lora_modules:
            entries.append(merged(name, f"{PREFIX}{module_of(name)}.base_layer.bias"))
            rows.append(Row(name, "bias", base.info(name).shape))
    for name in whole:
        entries.append(merged(name, PREFIX + name))
        rows.append(Row(name, "full", base.info(name).shape))
        if name == tied_emb:  # the tied head under its own name too, as peft saves it (ensure_weight_tying)
            tied = True
            entries.append(merged(name, f"{PREFIX}{TIED_HEAD}.weight"))
    modules_to_save = sorted({module_of(n) for n in whole} | ({TIED_HEAD} if tied and tied_emb in whole else set()))
    return sorted(entries, key=lambda e: e[0]), rows, modules_to_save, tied


def _config(inputs: MergeInputs, factors: dict[str, LowRank], modules_to_save: list[str], tied: bool,
            base_ref: str) -> "LoraConfig":
    """peft's LoraConfig: r the most common rank, the others in rank_pattern and alpha_pattern
    (α/r = 1 for every module), the union of the adapters' targets, their task type when they agree."""
    from peft import LoraConfig

    counts = Counter(f.rank for f in factors.values())
    r = max(counts, key=lambda k: (counts[k], k))
    pattern = {module_of(n): f.rank for n, f in factors.items() if f.rank != r}
    lora_biases = any(module_of(b) in {module_of(n) for n in factors} for b in inputs.biases)
    return LoraConfig(r=r, lora_alpha=r, rank_pattern=pattern, alpha_pattern=dict(pattern), lora_dropout=0.0,
                      target_modules=compact_targets([module_of(n) for n in factors],
                                                     [module_of(n) for n in inputs.base.tensors]),
                      modules_to_save=modules_to_save or None, bias="lora_only" if lora_biases else "none",
                      fan_in_fan_out=inputs.fan_in_fan_out, ensure_weight_tying=tied,
                      task_type=inputs.task_type, base_model_name_or_path=base_ref,
                      inference_mode=True)


def merge_adapters(config: AdapterMergeConfig | str | Path, out: str | Path, *, device: str = "cpu",
                   overwrite: bool = False, progress: Optional[ProgressCallback] = None,
                   cancel: Optional[CancelToken] = None, search_dirs: tuple[Path, ...] = ()) -> MergeAdaptersReport:
    """Merge the config's adapters into one LoRA adapter at `out` (written atomically: nothing is
    left there on failure or cancel) and return the report.

    `config`: an AdapterMergeConfig, or the path of its YAML file (whose folder relative adapter
    and base paths are resolved against, before `search_dirs`). `device`: where the SVDs and the
    methods run. `overwrite` replaces a folder an earlier merge-adapters run wrote. Raises
    `MergeError` (one line) on bad input and `Cancelled` when `cancel` is set.
    """
    start = time.monotonic()
    if not isinstance(config, AdapterMergeConfig):
        search_dirs = (Path(config).expanduser().resolve().parent, *search_dirs)
        config = load_config(config)
    config.check()
    _check_method(config)
    dev = check_device(device)
    dtype = dtype_from_name(config.dtype) if config.dtype else None
    refs = [a.ref for a in config.adapters] + ([config.base_model] if config.base_model else [])
    local = existing_dirs(p for ref in refs for p in (ref, *(d / ref for d in search_dirs)))
    AdapterFolder(out, overwrite=overwrite, sources=local, kind=MERGE_KIND)  # a bad OUT fails before any download
    base_ref = config.base_model or default_base(config.adapters, search_dirs)
    inputs = open_inputs(base_ref, config.adapters, search_dirs)
    try:
        folder = AdapterFolder(out, overwrite=overwrite, sources=inputs.folders, kind=MERGE_KIND)
        combiner, warnings = _combiner(config, inputs, dtype or torch.float32, dev)
        factors = _merge_modules(inputs, combiner, progress, cancel)
        entries, rows, modules_to_save, tied = _layout(inputs, factors, dtype)
        lora_config = _config(inputs, factors, modules_to_save, tied, base_ref)
        with folder:
            tmp = folder.temp()
            lora_config.save_pretrained(str(tmp))
            nbytes = write_safetensors(tmp / "adapter_model.safetensors", entries, cancel=cancel)
            report = MergeAdaptersReport(folder.out, config.method, rows, lora_config.r,
                                         sorted(lora_config.target_modules), modules_to_save, nbytes, 0.0,
                                         inputs.warnings + warnings + folder.warnings)
            folder.check_alive()  # a signal handler may have removed the folder meanwhile
            (tmp / REPORT).write_text(report.csv())
            record = {**config.record(), "base_model": base_ref}
            (tmp / CONFIG_FILE).write_text(yaml.safe_dump(record, sort_keys=False))
            if cancel is not None:
                cancel.check()
            folder.publish()
    finally:
        inputs.close()
    report.seconds = time.monotonic() - start
    return report
