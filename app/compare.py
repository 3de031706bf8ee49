"""The Compare tab's work: one input through several checkpoints, side by side.

- Causal LMs (`*ForCausalLM`): the prompt's tokens (through the checkpoint's tokenizer, or as
  token ids when it has none), the greedy continuation, the top-k next tokens with their
  probabilities, the prompt's perplexity, and how far each model's next-token distributions
  are from a reference model's (mean KL over the prompt positions).
- Image classifiers (`*ForImageClassification`): the top-k classes with confidences for one
  image; optionally with another checkpoint's classifier head on each body (`head_from`, as
  in task-head merging) and over a task's classes only (`classes`). With a tasks file,
  `task_heads` gives each classification task's head and classes, so every body (base,
  experts, merges) can be scored the way the evaluator scores that task.
- With a tasks file (`mergecore.eval`), `evaluate_models` scores every model on the tasks.

Models, tokenizers, image preprocessing and task heads come from one `mergecore.models.ModelPool`
(the evaluator's loaders: an image is prepared as the evaluator prepares it, a head is put on a
body as the evaluator puts it); the few most recently used models stay in it. A model whose
architecture is not in transformers runs its repository's code only when the caller turns
`trust_remote_code` on.
"""

from __future__ import annotations

import html
import json
import math
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable, Optional

from mergecore.errors import MergeError

_RECENT: "OrderedDict[Path, float]" = OrderedDict()  # the pooled models, least recently used first (their stamp)
_LOCK = threading.RLock()
_POOL: list[Any] = []
CACHE_SIZE = 6
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def pool():
    """The app's `ModelPool` (Compare and Evaluate share it)."""
    with _LOCK:
        if not _POOL:
            from mergecore.models import ModelPool

            _POOL.append(ModelPool())
        return _POOL[0]


def _touch(path: Path) -> None:
    """`path` was just used: keep it, drop it first if its files changed, and the oldest beyond CACHE_SIZE."""
    stamp = _stamp(path)
    with _LOCK:
        if _RECENT.get(path, stamp) != stamp:
            pool().release(path)
        _RECENT[path] = stamp
        _RECENT.move_to_end(path)
        while len(_RECENT) > CACHE_SIZE:
            pool().release(_RECENT.popitem(last=False)[0])


def read_config(path: str | Path) -> dict[str, Any]:
    p = Path(path) / "config.json"
    if not p.is_file():
        raise MergeError(f"{path} has no config.json")
    return json.loads(p.read_text())


def model_kind(path: str | Path) -> str:
    """'causal-lm', 'image-classification' or 'other' (the engine's rule, on the folder's config.json)."""
    from mergecore.arch import model_kind as kind_of

    return kind_of(read_config(path))


def _stamp(path: Path) -> float:
    return max((p.stat().st_mtime for p in path.glob("*") if p.is_file()), default=0.0)


def load_model(path: str | Path, trust_remote_code: bool = False):
    """A checkpoint as an eval-mode transformers model on CPU (float32), from the pool."""
    import transformers

    transformers.utils.logging.disable_progress_bar()
    p = Path(path).resolve()
    archs = read_config(p).get("architectures") or []
    if archs and getattr(transformers, archs[0], None) is not None:
        _touch(p)
        return pool().model(p)
    if not trust_remote_code:
        raise MergeError(f"{p.name}: architecture {archs[0] if archs else '(none)'} is not in transformers; it "
                         f"would need the repository's own code -- turn on 'trust remote code' on the Models "
                         f"tab only if you trust it")
    import torch

    auto = {"causal-lm": transformers.AutoModelForCausalLM,
            "image-classification": transformers.AutoModelForImageClassification}.get(model_kind(p), transformers.AutoModel)
    try:
        return auto.from_pretrained(str(p), dtype=torch.float32, local_files_only=True, trust_remote_code=True).eval()
    except Exception as err:
        msg = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise MergeError(f"cannot load {p.name}: {msg}") from None


# ---------------------------------------------------------------------------------------------
# language models


def load_tokenizer(path: str | Path, trust_remote_code: bool = False):
    """The checkpoint's tokenizer, or None when it has none (prompts are then token ids or bytes)."""
    p = Path(path)
    if not any((p / f).is_file() for f in TOKENIZER_FILES):
        return None
    try:
        if trust_remote_code:
            from transformers import AutoTokenizer

            return AutoTokenizer.from_pretrained(str(p), local_files_only=True, trust_remote_code=True)
        return pool().tokenizer(p)
    except Exception:
        return None


def encode_prompt(prompt: str, tokenizer, vocab_size: int) -> tuple[list[int], str]:
    """Token ids for the prompt and how they were made."""
    prompt = prompt or ""
    if tokenizer is not None:
        ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
        if ids:
            return list(ids), "tokenizer"
    parts = prompt.replace(",", " ").split()
    if parts and all(p.lstrip("-").isdigit() for p in parts):
        ids = [int(p) for p in parts]
        bad = [i for i in ids if not 0 <= i < vocab_size]
        if bad:
            raise MergeError(f"token ids must be in [0, {vocab_size}); got {bad[:5]}")
        return ids, "token ids"
    data = prompt.encode("utf-8") or b"\x00"
    return [b % vocab_size for b in data], "bytes (no tokenizer)"


def _token_text(tok, i: int) -> str:
    if tok is None:
        return str(i)
    try:
        return tok.decode([i])
    except Exception:
        return str(i)


def lm_outputs(path: str | Path, ids: list[int], *, new_tokens: int = 8, top_k: int = 5,
               tokenizer=None, trust_remote_code: bool = False) -> dict[str, Any]:
    import torch

    model = load_model(path, trust_remote_code)
    x = torch.tensor([ids], dtype=torch.long)
    with torch.no_grad():
        logits = model(input_ids=x).logits[0].float()
        logp = torch.log_softmax(logits, dim=-1)
        nll = -logp[:-1].gather(1, x[0, 1:, None]).mean().item() if len(ids) > 1 else float("nan")
        probs = logp[-1].exp()
        top = torch.topk(probs, min(top_k, probs.numel()))
        cur = x
        gen: list[int] = []
        for _ in range(max(0, int(new_tokens))):
            nxt = model(input_ids=cur).logits[0, -1].argmax().item()
            gen.append(int(nxt))
            cur = torch.cat([cur, torch.tensor([[nxt]])], dim=1)
    return {
        "logp": logp,  # [positions, vocab]
        "top": [(int(i), _token_text(tokenizer, int(i)), float(p)) for p, i in zip(top.values, top.indices)],
        "greedy": gen,
        "greedy_text": tokenizer.decode(gen) if tokenizer is not None else " ".join(map(str, gen)),
        "perplexity": math.exp(nll) if not math.isnan(nll) else float("nan"),
    }


def _each(models: dict[str, str | Path], kind: str, what: str, reference: Optional[str],
          run: Callable[[str | Path], dict[str, Any]]) -> tuple[dict[str, Any], str]:
    """`run(path)` for every model (all of one kind), and the reference model's name."""
    if not models:
        raise MergeError("choose at least one model to compare")
    out = {}
    for name, path in models.items():
        if model_kind(path) != kind:
            raise MergeError(f"'{name}' is not {what}; compare models of one kind")
        out[name] = run(path)
    return out, reference if reference in out else next(iter(out))


def compare_lms(models: dict[str, str | Path], prompt: str, *, new_tokens: int = 8, top_k: int = 5,
                reference: Optional[str] = None, trust_remote_code: bool = False) -> dict[str, Any]:
    """Run the prompt through every model; returns per-model outputs and a summary table."""
    import torch

    if not models:
        raise MergeError("choose at least one model to compare")
    first = next(iter(models.values()))
    tok = load_tokenizer(first, trust_remote_code)
    vocab = int(read_config(first).get("vocab_size") or 0) or 32000
    ids, how = encode_prompt(prompt, tok, vocab)
    out, ref = _each(models, "causal-lm", "a causal language model", reference,
                     lambda path: lm_outputs(path, ids, new_tokens=new_tokens, top_k=top_k, tokenizer=tok,
                                             trust_remote_code=trust_remote_code))
    rows = []
    for name, r in out.items():
        kl = torch.nn.functional.kl_div(r["logp"], out[ref]["logp"], log_target=True, reduction="none").sum(-1).mean().item()
        same = sum(a == b for a, b in zip(r["greedy"], out[ref]["greedy"]))
        rows.append({
            "model": name,
            "next token": r["top"][0][1] if r["top"] else "",
            "p(next)": round(r["top"][0][2], 4) if r["top"] else None,
            "prompt perplexity": round(r["perplexity"], 3),
            f"KL({ref} ‖ model)": round(kl, 5),
            f"greedy tokens same as {ref}": f"{same}/{len(r['greedy'])}",
        })
    return {"kind": "causal-lm", "input": ids, "encoding": how, "reference": ref, "outputs": out, "rows": rows,
            "tokenizer": tok is not None}


# ---------------------------------------------------------------------------------------------
# image classifiers


def head_prefix() -> str:
    """Where a classifier head's tensors are, by default (the evaluator's classification tasks')."""
    from mergecore.eval.kinds.classification import ClassificationSpec

    return ClassificationSpec.model_fields["head_prefix"].default


def image_inputs(image: Any, path: str | Path):
    """Pixel values for one image (numpy array, PIL image or file path), prepared for the model at
    `path` as the evaluator prepares its images."""
    import numpy as np
    from PIL import Image

    if image is None:
        raise MergeError("give an image to classify")
    arr = np.asarray(Image.open(image) if isinstance(image, (str, Path)) else image)
    if arr.dtype != np.uint8:
        arr = np.clip(arr * (255.0 if arr.max() <= 1.0 else 1.0), 0, 255).astype(np.uint8)
    return pool().image_prep(Path(path).resolve())(arr[None])


def classify(path: str | Path, image: Any, *, top_k: int = 5, head_from: Optional[str | Path] = None,
             classes: Optional[list[int]] = None, trust_remote_code: bool = False,
             prefix: Optional[str] = None) -> dict[str, Any]:
    """Top-k classes of `image`; with `head_from`, that checkpoint's classifier (the tensors under
    `prefix`) on this body, as the evaluator scores a task with a head, and its class names; with
    `classes`, the probabilities are a softmax over those logits only."""
    import torch

    from mergecore.eval.kind import call_with_head, head_for

    model = load_model(path, trust_remote_code)
    names_cfg = read_config(head_from if head_from is not None else path)
    head = None
    if head_from is not None and Path(head_from).resolve() != Path(path).resolve():
        src = Path(head_from).resolve()
        head = head_for(model, pool().head(src, prefix or head_prefix()), src, Path(path).name)
    with torch.no_grad():
        logits = call_with_head(model, head, {"pixel_values": image_inputs(image, path)}).logits[0].float()
    id2label = {int(k): v for k, v in (names_cfg.get("id2label") or {}).items()}
    if classes:
        if max(classes) >= logits.numel():
            raise MergeError(f"classes go up to {max(classes)} but {Path(path).name} has {logits.numel()} outputs")
        ids = torch.as_tensor(list(classes))
        probs = torch.softmax(logits[ids], -1)
    else:
        ids = torch.arange(logits.numel())
        probs = torch.softmax(logits, -1)
    top = torch.topk(probs, min(top_k, probs.numel()))
    return {
        "probs": probs,
        "top": [(int(ids[i]), id2label.get(int(ids[i]), f"class {int(ids[i])}"), float(p))
                for p, i in zip(top.values, top.indices)],
    }


def compare_classifiers(models: dict[str, str | Path], image: Any, *, top_k: int = 5,
                        head_from: Optional[str | Path] = None, classes: Optional[list[int]] = None,
                        reference: Optional[str] = None, truth: Optional[str] = None,
                        trust_remote_code: bool = False, prefix: Optional[str] = None) -> dict[str, Any]:
    """Every model on one image. `truth` (a class name, optional) marks right and wrong answers."""
    out, ref = _each(models, "image-classification", "an image classifier", reference,
                     lambda path: classify(path, image, top_k=top_k, head_from=head_from, classes=classes,
                                           trust_remote_code=trust_remote_code, prefix=prefix))
    rows = []
    for name, r in out.items():
        p, q = r["probs"], out[ref]["probs"]
        kl = float((q * (q.clamp_min(1e-12).log() - p.clamp_min(1e-12).log())).sum()) if p.shape == q.shape else float("nan")
        row = {
            "model": name,
            "prediction": r["top"][0][1],
            "confidence": round(r["top"][0][2], 4),
        }
        if truth:
            row["correct"] = "yes" if r["top"][0][1] == truth else "no"
        row[f"same as {ref}"] = "yes" if r["top"][0][0] == out[ref]["top"][0][0] else "no"
        row[f"KL({ref} ‖ model)"] = round(kl, 5)
        rows.append(row)
    return {"kind": "image-classification", "reference": ref, "outputs": out, "rows": rows, "truth": truth or None}


_TASK_CACHE: dict[tuple[str, float], dict[str, dict[str, Any]]] = {}


def task_heads(tasks: str | Path) -> dict[str, dict[str, Any]]:
    """Classification tasks of a tasks file that name a head: {task: {"head": folder, "prefix": where
    its tensors are, "classes": [ids] or None, "description": text}} (cached per file version; {}
    if the file has none)."""
    from mergecore.eval.tasks import ClassificationTask, load_tasks

    p = Path(tasks)
    if not p.is_file():
        return {}
    key = (str(p.resolve()), p.stat().st_mtime)
    if key not in _TASK_CACHE:
        out = {}
        for t in load_tasks(p):
            if isinstance(t, ClassificationTask) and t.head_from is not None:
                out[t.name] = {"head": str(t.head_path()), "prefix": t.spec.head_prefix,
                               "classes": list(t.classes) if t.classes else None,
                               "description": t.spec.description or ""}
        _TASK_CACHE[key] = out
    return _TASK_CACHE[key]


# ---------------------------------------------------------------------------------------------
# rendering


def _bar(label: str, p: float) -> str:
    pct = max(0.0, min(100.0, 100 * p))
    return (f'<div class="cmp-row"><span class="cmp-label">{html.escape(label)}</span>'
            f'<span class="cmp-bar"><span style="width:{pct:.1f}%"></span></span>'
            f'<span class="cmp-p">{p:.3f}</span></div>')


CSS = """
.cmp-grid { display: flex; flex-wrap: wrap; gap: 10px; }
.cmp-card { flex: 1 1 200px; border: 1px solid var(--border-color-primary); border-radius: 8px; padding: 8px 10px;
            background: var(--block-background-fill); min-width: 180px; }
.cmp-card h4 { margin: 0 0 4px 0; font-size: 15px; }
.cmp-tag { font-size: 11px; padding: 1px 6px; border-radius: 8px; background: var(--neutral-200); color: #333;
           margin-left: 6px; }
.cmp-tag.merged { background: #fde68a; }
.cmp-row { display: flex; align-items: center; gap: 6px; font-size: 13px; margin: 2px 0; }
.cmp-label { flex: 0 0 40%; overflow: hidden; text-overflow: ellipsis; white-space: nowrap; font-family: var(--font-mono); }
.cmp-bar { flex: 1; height: 10px; background: var(--neutral-200); border-radius: 5px; overflow: hidden; }
.cmp-bar span { display: block; height: 100%; background: var(--color-accent); }
.cmp-p { flex: 0 0 44px; text-align: right; font-family: var(--font-mono); }
.cmp-gen { font-family: var(--font-mono); font-size: 13px; background: var(--background-fill-secondary);
           padding: 4px 6px; border-radius: 4px; margin: 4px 0; word-break: break-all; }
.cmp-note { font-size: 12px; color: var(--body-text-color-subdued); }
.cmp-verdict { font-weight: 600; margin-left: 4px; }
.cmp-verdict.ok { color: #15803d; }
.cmp-verdict.wrong { color: #b91c1c; }
#cmp-image img { image-rendering: pixelated; height: 168px !important; width: 168px !important;
                 object-fit: contain; }
.cmp-card { max-width: 330px; }
"""


def render_html(result: dict[str, Any], merged: Optional[set[str]] = None) -> str:
    merged = merged or set()
    truth = result.get("truth")
    cards = []
    for name, r in result["outputs"].items():
        tag = '<span class="cmp-tag merged">merged</span>' if name in merged else '<span class="cmp-tag">source</span>'
        body = [f"<h4>{html.escape(name)}{tag}</h4>"]
        if result["kind"] == "causal-lm":
            body.append(f'<div class="cmp-note">greedy continuation</div><div class="cmp-gen">'
                        f'{html.escape(r["greedy_text"])}</div>')
            body.append('<div class="cmp-note">next token</div>')
        else:
            verdict = ""
            if truth:
                ok = r["top"][0][1] == truth
                verdict = (f' <span class="cmp-verdict {"ok" if ok else "wrong"}">'
                           f'{"✓ right" if ok else "✗ wrong"}</span>')
            body.append(f'<div class="cmp-note">prediction{verdict}</div>')
        body += [_bar(label, p) for _, label, p in r["top"]]
        cards.append(f'<div class="cmp-card">{"".join(body)}</div>')
    note = ""
    if result["kind"] == "causal-lm":
        note = (f'<div class="cmp-note">input: {len(result["input"])} tokens ({html.escape(result["encoding"])}): '
                f'{html.escape(" ".join(map(str, result["input"][:40])))}{" ..." if len(result["input"]) > 40 else ""}</div>')
    if result["kind"] != "causal-lm" and result.get("head_note"):
        note = f'<div class="cmp-note">{html.escape(result["head_note"])}</div>'
    return note + f'<div class="cmp-grid">{"".join(cards)}</div>'


def rows_frame(rows: list[dict[str, Any]]):
    import pandas as pd

    return pd.DataFrame(rows)


# ---------------------------------------------------------------------------------------------
# evaluation on tasks


def evaluate_models(models: dict[str, str | Path], tasks: str | Path, *, subset: Any = None,
                    progress: Optional[Callable[[Any], None]] = None, cancel=None,
                    log: Optional[Callable[[str], None]] = None):
    """Score every model on the tasks; one row per model (task scores and their mean)."""
    import pandas as pd

    from mergecore.eval import Evaluator

    ev = Evaluator(tasks, subset=subset, processor_from=next(iter(models.values())) if models else None, pool=pool())
    rows = []
    for name, path in models.items():
        if cancel is not None:
            cancel.check()
        res = ev.evaluate(path, progress=progress, cancel=cancel)
        _touch(Path(path).resolve())
        row = {"model": name, **{k: round(v, 4) for k, v in res.scores.items()}, "mean": round(res.mean, 4)}
        rows.append(row)
        if log:
            log(f"{name}: mean {res.mean:.4f} ({res.seconds:.1f} s)")
    return pd.DataFrame(rows)
