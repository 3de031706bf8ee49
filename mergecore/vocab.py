"""The output vocabulary when `tokenizer_source` (or a `tokenizer:` block) is set.

Semantics follow mergekit's tokenizer merge:

* `union`: the base model's tokenizer (or the first model's) with every token another model has
  and it lacks added as added tokens -- first the ordinary tokens, in model order, then the
  other models' added (special) tokens; `base` / a model: that model's tokenizer as it is.
  Tokens listed under `tokenizer: {tokens: ...}` are added too.
* Every embedding-like tensor (a tensor outside the layers whose first dimension is a model's
  vocabulary size: input embeddings, LM head) is permuted per model into the output vocabulary
  before the merge method runs. A model that lacks a token gets, in this order: the `tokens:`
  entry's row; the base model's row if the base has the token; the row of the one model that has
  it; the mean of the rows of the models that have it; zeros if none of the tensor's models has it.
  The candidates are the models that feed the tensor (as in mergekit).
* `pad_to_multiple_of` rounds the row count up; each model's padding rows are the mean of its
  permuted rows (as in mergekit).

When every model has the same token -> row map, the same number of rows and nothing asks for
padding or extra tokens, there is no vocabulary plan at all: the merge is what it was without one.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import torch

from mergecore.arch import GENERIC
from mergecore.errors import MergeError
from mergecore.io.source import read_json_file

if TYPE_CHECKING:  # pragma: no cover
    from mergecore.io.source import ModelSource, TensorInfo
    from mergecore.recipe import Recipe

# files that hold a vocabulary (tokenizer_config.json alone does not)
VOCAB_FILES = ("tokenizer.json", "tokenizer.model", "spiece.model", "vocab.json", "vocab.txt", "merges.txt")
_ID_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id", "sep_token_id", "decoder_start_token_id")


def has_tokenizer(path: Path) -> bool:
    return any((path / f).is_file() for f in VOCAB_FILES) or any(path.glob("*.tiktoken"))


def config_vocab_size(config: dict[str, Any]) -> Optional[int]:
    if isinstance(config.get("vocab_size"), int):
        return config["vocab_size"]
    for sub in ("text_config", "decoder"):
        if isinstance(config.get(sub), dict) and isinstance(config[sub].get("vocab_size"), int):
            return config[sub]["vocab_size"]
    return None


def _signature(path: Path) -> str:
    """A hash of what defines a tokenizer's token -> id map (not its template or settings)."""
    h = hashlib.sha256()
    tj = path / "tokenizer.json"
    if tj.is_file():
        try:
            data = read_json_file(tj, "tokenizer.json")
        except MergeError:  # unreadable or oversized: the bytes still tell two tokenizers apart
            data = None
        if isinstance(data, dict):
            h.update(json.dumps([data.get("model"), data.get("added_tokens")], sort_keys=True).encode())
        else:
            h.update(tj.read_bytes())
    else:
        for f in VOCAB_FILES[1:] + ("added_tokens.json",):
            if (path / f).is_file():
                h.update(f.encode() + b"\0" + (path / f).read_bytes())
    return h.hexdigest()


@dataclass(frozen=True)
class TokenOverride:
    """One `tokenizer: {tokens: ...}` entry, resolved: where a token's row comes from."""

    kind: str  # "default" | "zero" | "model" (the model's row of this token) | "row" (a fixed row of a model)
    model: Optional[str] = None
    row: int = -1
    force: bool = False


def _parse_tokens(tokens: dict[str, Any], models: list[str]) -> dict[str, dict[str, Any]]:
    """Check the `tokens:` block's shape; model rows of `token:` entries are resolved later."""
    out: dict[str, dict[str, Any]] = {}
    for tok, spec in tokens.items():
        where = f"tokenizer.tokens['{tok}']"
        if spec is None:
            spec = {}
        if not isinstance(spec, dict) or set(spec) - {"source", "force"}:
            raise MergeError(f"{where}: expected a mapping with 'source' and/or 'force', got {spec!r}")
        force = spec.get("force", False)
        if not isinstance(force, bool):
            raise MergeError(f"{where}: 'force' must be true or false, got {force!r}")
        src = spec.get("source")
        entry: dict[str, Any] = {"force": force}
        if src is None:
            entry["kind"] = "default"
        elif isinstance(src, str):
            entry.update(kind="model", model=src)
        elif isinstance(src, dict) and src.get("kind") == "zero" and set(src) == {"kind"}:
            entry["kind"] = "zero"
        elif isinstance(src, dict) and src.get("kind") == "model_token":
            if set(src) - {"kind", "model", "token", "token_id"} or "model" not in src:
                raise MergeError(f"{where}: a model_token source takes 'model' and one of 'token' or 'token_id'")
            if ("token" in src) == ("token_id" in src):
                raise MergeError(f"{where}: a model_token source takes exactly one of 'token' or 'token_id'")
            if "token_id" in src and not (isinstance(src["token_id"], int) and src["token_id"] >= 0):
                raise MergeError(f"{where}: token_id must be a non-negative integer, got {src['token_id']!r}")
            entry.update(kind="model_token", model=src["model"], token=src.get("token"), token_id=src.get("token_id"))
        else:
            raise MergeError(
                f"{where}: source must be a model, {{kind: zero}} or {{kind: model_token, model, token|token_id}}, "
                f"got {src!r}"
            )
        if entry.get("model") is not None and entry["model"] not in models:
            raise MergeError(f"{where}: model '{entry['model']}' is not one of the recipe's models")
        if force and entry["kind"] == "default":
            raise MergeError(f"{where}: 'force' needs a 'source'")
        out[tok] = entry
    return out


@dataclass
class VocabPlan:
    """How embedding rows map into the output vocabulary, and the tokenizer to save."""

    source: str  # "union", "base" or a model
    donor: str  # the model whose tokenizer the output is (or extends)
    n_tokens: int  # output ids 0 .. n_tokens-1
    size: int  # output rows: n_tokens rounded up to pad_to_multiple_of
    index: dict[str, torch.Tensor]  # per model: output id -> that model's row, -1 where it lacks the token
    rows: dict[str, int]  # per model: its vocabulary size (embedding rows)
    overrides: dict[int, TokenOverride] = field(default_factory=dict)  # output id -> `tokens:` entry
    tokenizer: Any = None  # a built tokenizer to save; None: copy the donor's tokenizer files
    id_map: dict[int, int] = field(default_factory=dict)  # reference model's special ids -> output ids
    tensors: list[str] = field(default_factory=list)  # output tensors that are permuted (filled by the planner)
    warnings: list[str] = field(default_factory=list)

    # -- planning ----------------------------------------------------------------------------

    def is_vocab_tensor(self, name: str, infos: dict[str, Optional["TensorInfo"]]) -> bool:
        """True if `name` is indexed by token in every model that feeds it (`infos`: model -> info)."""
        if any(h in name for h in GENERIC.not_vocab) or not infos:
            return False
        for model, info in infos.items():
            if info is None or not info.shape or not info.dtype.is_floating_point or model not in self.rows:
                return False
            if info.shape[0] != self.rows[model]:
                return False
            if len(info.shape) < 2 and not any(h in name for h in GENERIC.vocab_vectors):
                return False  # a 1-D tensor (a norm) whose size happens to be the vocabulary size
        for tid, ov in self.overrides.items():
            if ov.model is not None and ov.model not in infos:
                raise MergeError(
                    f"tokenizer.tokens: token id {tid} takes its row from '{ov.model}', which does not feed "
                    f"tensor '{name}' (its models: {', '.join(infos)})"
                )
        if name not in self.tensors:
            self.tensors.append(name)
            anyone = torch.zeros(self.n_tokens, dtype=torch.bool)
            for model in infos:
                anyone |= self.index[model] >= 0
            for tid, ov in self.overrides.items():
                anyone[tid] = anyone[tid] or ov.kind != "default"
            lost = int((~anyone).sum())
            if lost:
                self.warnings.append(
                    f"{lost} of the output vocabulary's tokens are in none of the models feeding '{name}' "
                    f"({', '.join(infos)}); their rows are zero")
        return True

    def output_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        return (self.size, *shape[1:])

    def update_config(self, config: dict[str, Any]) -> dict[str, Any]:
        """The output config with its vocabulary size (and special token ids) for this vocabulary."""
        out = dict(config)
        placed = False
        for sub in ("text_config", "decoder"):
            if isinstance(out.get(sub), dict) and "vocab_size" in out[sub]:
                out[sub] = {**out[sub], "vocab_size": self.size}
                placed = True
        if "vocab_size" in out or not placed:
            out["vocab_size"] = self.size
        return self.translate_ids(out)

    def translate_ids(self, config: dict[str, Any]) -> dict[str, Any]:
        """Special token ids (bos/eos/pad...) of the reference model renumbered to the output vocabulary."""
        if not self.id_map:
            return config
        out = dict(config)

        def tr(v: Any) -> Any:
            if isinstance(v, bool) or not isinstance(v, (int, list)):
                return v
            if isinstance(v, list):
                return [tr(x) for x in v]
            return self.id_map.get(v, v)

        for key in _ID_KEYS:
            if key in out:
                out[key] = tr(out[key])
        return out

    def describe(self) -> str:
        kind = {"union": "union of the models' tokenizers", "base": "the base model's tokenizer"}.get(
            self.source, f"the tokenizer of '{self.source}'")
        pad = f", padded to {self.size} rows" if self.size != self.n_tokens else ""
        per = "; ".join(
            f"{m}: {self.rows[m]} rows, {int((self.index[m] < 0).sum())} missing" for m in self.index
        )
        return (f"vocabulary: {kind} -> {self.n_tokens} tokens{pad} ({per}); permuted: "
                f"{', '.join(self.tensors) or '(no embedding tensors found)'}")

    # -- execution ---------------------------------------------------------------------------

    def permute(self, tensors: list[tuple[str, torch.Tensor]], base: Optional[str],
                name: str = "") -> list[torch.Tensor]:
        """Each (model, tensor) with its rows in the output vocabulary, in the same order.

        `base`: the model whose row fills a token some models lack, if it has it. Candidates for
        a fill are the models in `tensors`.
        """
        first: dict[str, torch.Tensor] = {}
        for m, t in tensors:
            first.setdefault(m, t)
        models = list(first)
        n, size = self.n_tokens, self.size
        t0 = first[models[0]]
        rest, dtype, dev = tuple(t0.shape[1:]), t0.dtype, t0.device
        idx = {m: self.index[m].to(dev) for m in models}
        present = torch.stack([idx[m] >= 0 for m in models])  # (M, n)

        gathered: dict[str, torch.Tensor] = {}
        for m in models:
            g = torch.zeros((size, *rest), dtype=dtype, device=dev)
            mask = present[models.index(m)]
            g[:n][mask] = first[m][idx[m][mask]]
            gathered[m] = g

        # default fill: rows for tokens that some model lacks
        count = present.sum(0)
        need = (~present).any(0)
        for tid, ov in self.overrides.items():
            if ov.force:
                need[tid] = True
        need_ids = need.nonzero().flatten()
        fill = torch.zeros((len(need_ids), *rest), dtype=dtype, device=dev)
        if len(need_ids):
            p = present[:, need_ids]  # (M, k)
            c = count[need_ids]
            w = torch.zeros(p.shape, dtype=dtype, device=dev)
            multi = c >= 2
            w[:, ~multi] = p[:, ~multi].to(dtype)  # the one model that has it (or none: zeros)
            w[:, multi] = p[:, multi].to(dtype) / c[multi].to(dtype)  # mean of the models that have it
            if base in models:
                bi = models.index(base)
                use_base = multi & p[bi]
                w[:, use_base] = 0
                w[bi, use_base] = 1
            for mi, m in enumerate(models):
                wm = w[mi].reshape(-1, *([1] * len(rest)))
                if bool((w[mi] != 0).any()):
                    fill += wm * gathered[m][need_ids]
            pos = {int(t): k for k, t in enumerate(need_ids.tolist())}
            for tid, ov in self.overrides.items():
                if ov.kind == "default" or tid not in pos:  # every model has it: no fill needed
                    continue
                if ov.kind == "zero":
                    fill[pos[tid]] = 0
                elif ov.kind == "model":
                    if not bool(present[models.index(ov.model), tid]):
                        raise MergeError(f"tokenizer.tokens: model '{ov.model}' has no row for output token id {tid}")
                    fill[pos[tid]] = gathered[ov.model][tid]
                else:  # a fixed row of a model's own tensor
                    src = first[ov.model]
                    if not 0 <= ov.row < src.shape[0]:
                        raise MergeError(
                            f"tokenizer.tokens: row {ov.row} is outside '{ov.model}'s {name or 'tensor'} "
                            f"({src.shape[0]} rows)")
                    fill[pos[tid]] = src[ov.row]
            forced = torch.zeros(n, dtype=torch.bool, device=dev)
            for tid, ov in self.overrides.items():
                if ov.force:
                    forced[tid] = True
            for mi, m in enumerate(models):
                take = (~p[mi]) | forced[need_ids]
                rows = need_ids[take]
                gathered[m][rows] = fill[take]

        if size > n:
            for m in models:
                gathered[m][n:] = gathered[m][:n].mean(0)
        out, given = [], set()
        for m, _ in tensors:  # a model listed twice gets its own copy (methods may work in place)
            out.append(gathered[m].clone() if m in given else gathered[m])
            given.add(m)
        return out

    # -- side files --------------------------------------------------------------------------

    def save_tokenizer(self, folder: Path) -> None:
        self.tokenizer.save_pretrained(str(folder))


def _load_tokenizer(model: str, path: Path) -> Any:
    try:
        from transformers import AutoTokenizer
    except ImportError:  # pragma: no cover - a dependency
        raise MergeError("transformers is not installed; tokenizer_source needs it to read tokenizers") from None
    try:
        return AutoTokenizer.from_pretrained(str(path), trust_remote_code=False, use_fast=True)
    except Exception as err:  # noqa: BLE001 - any loader failure is the model's tokenizer being unusable
        msg = str(err).splitlines()[0][:200] if str(err) else type(err).__name__
        raise MergeError(f"cannot load the tokenizer of '{model}' ({path}): {msg}") from None


def plan_vocabulary(recipe: "Recipe", sources: dict[str, "ModelSource"]) -> Optional[VocabPlan]:
    """The vocabulary plan of `recipe`, or None when the embeddings need no change."""
    source = recipe.effective_tokenizer_source
    if source is None:
        return None
    models = list(sources)
    cfg = recipe.tokenizer
    pad = cfg.pad_to_multiple_of if cfg is not None else None
    if pad is not None and pad < 1:
        raise MergeError(f"tokenizer.pad_to_multiple_of must be a positive integer, got {pad}")
    token_specs = _parse_tokens(cfg.tokens, models) if cfg is not None and cfg.tokens else {}
    base = recipe.base_model or models[0]  # mergekit: the base model, else the first model
    donor = base if source in ("union", "base") else source
    if donor not in sources:
        raise MergeError(f"tokenizer_source: model '{donor}' is not one of the recipe's models")

    has = {m: has_tokenizer(s.path) for m, s in sources.items()}
    if source == "union":
        for m in models:
            if not has[m]:
                raise MergeError(
                    f"tokenizer_source: union needs every model's tokenizer, but '{m}' has no tokenizer files "
                    f"({', '.join(VOCAB_FILES[:5])})"
                )
    elif not has[donor]:
        if token_specs or pad:
            raise MergeError(f"tokenizer: '{donor}' has no tokenizer files to build the output tokenizer from")
        return None  # nothing to copy, nothing to permute (as without tokenizer_source)
    # models without a tokenizer share the base's vocabulary (mergekit assumes the same)
    stand_in = {m: (m if has[m] else (base if has[base] else donor)) for m in models}

    rows: dict[str, int] = {}
    for m, s in sources.items():
        r = config_vocab_size(s.config)
        rows[m] = r if r is not None else -1  # filled from the tokenizer below

    # cheap check first: same tokenizer files and same sizes -> nothing to do
    if not token_specs and all(r > 0 for r in rows.values()):
        sigs = {_signature(sources[stand_in[m]].path) for m in models}
        sizes = set(rows.values())
        if len(sigs) == 1 and len(sizes) == 1 and (not pad or next(iter(sizes)) % pad == 0):
            return None

    toks = {m: _load_tokenizer(m, sources[m].path) for m in models if has[m]}
    full_vocab: dict[str, dict[str, int]] = {}
    vocab: dict[str, dict[str, int]] = {}
    for m in models:
        tok = toks[stand_in[m]]
        full_vocab[m] = tok.get_vocab()
        if rows[m] < 0:
            rows[m] = max(full_vocab[m].values(), default=-1) + 1
        vocab[m] = {t: i for t, i in full_vocab[m].items() if i < rows[m]}

    # the output tokenizer
    out_tok = toks[donor]
    built = False
    if source == "union":
        known = set(out_tok.get_vocab())
        plain: list[str] = []
        added: list[Any] = []
        seen_added: set[str] = set()
        for m in [base] + [x for x in models if x != base]:
            tok = toks[stand_in[m]]
            dec = {i: a for i, a in tok.added_tokens_decoder.items() if i < rows[m]}
            added_text = {a.content for a in dec.values()}
            for t, i in sorted(vocab[m].items(), key=lambda kv: kv[1]):
                if t not in added_text and t not in known:
                    known.add(t)
                    plain.append(t)
            for i in sorted(dec):
                if dec[i].content not in seen_added:
                    seen_added.add(dec[i].content)
                    added.append(dec[i])
        new_added = [a for a in added if a.content not in known and a.content not in plain]
        if plain:
            out_tok.add_tokens(plain)
        for a in new_added:
            out_tok.add_tokens(a)
        built = bool(plain or new_added)
    extra = [t for t in token_specs if t not in out_tok.get_vocab()]
    if extra:
        out_tok.add_tokens(extra)
        built = True

    out_vocab = out_tok.get_vocab()
    n_tokens = max(out_vocab.values(), default=-1) + 1
    size = n_tokens if not pad or n_tokens % pad == 0 else (n_tokens // pad + 1) * pad
    index: dict[str, torch.Tensor] = {}
    ids = torch.tensor(list(out_vocab.values()), dtype=torch.long)
    for m in models:
        mv = vocab[m]
        idx = torch.full((n_tokens,), -1, dtype=torch.long)
        idx[ids] = torch.tensor([mv.get(t, -1) for t in out_vocab], dtype=torch.long)
        index[m] = idx

    overrides: dict[int, TokenOverride] = {}
    for t, spec in token_specs.items():
        tid = out_vocab[t]
        kind = spec["kind"]
        if kind == "model_token":
            m = spec["model"]
            row = spec["token_id"]
            if row is None:
                if spec["token"] not in full_vocab[m]:
                    raise MergeError(f"tokenizer.tokens['{t}']: model '{m}' has no token '{spec['token']}'")
                row = full_vocab[m][spec["token"]]
            overrides[tid] = TokenOverride("row", m, row, spec["force"])
        elif kind == "model":
            if index[spec["model"]][tid] < 0:
                raise MergeError(f"tokenizer.tokens['{t}']: model '{spec['model']}' has no token '{t}'")
            overrides[tid] = TokenOverride("model", spec["model"], -1, spec["force"])
        else:
            overrides[tid] = TokenOverride(kind, None, -1, spec["force"])

    same = all(vocab[m] == vocab[base] and rows[m] == rows[base] for m in models)
    if same and not built and not overrides and (not pad or rows[base] % pad == 0):
        return None  # same vocabulary everywhere: the merge goes on as without one

    # the reference model's special token ids in the output vocabulary
    ref = base
    inv = {i: t for t, i in full_vocab[ref].items()}
    id_map = {}
    for key in _ID_KEYS:
        v = sources[ref].config.get(key)
        for i in (v if isinstance(v, list) else [v]):
            if isinstance(i, int) and not isinstance(i, bool) and i in inv and inv[i] in out_vocab:
                if out_vocab[inv[i]] != i:
                    id_map[i] = out_vocab[inv[i]]

    return VocabPlan(
        source=source, donor=donor, n_tokens=n_tokens, size=size, index=index, rows=rows,
        overrides=overrides, tokenizer=out_tok if built else None, id_map=id_map,
    )
