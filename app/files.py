"""Where the app writes, and the files it offers for download.

    <work_dir>/sessions/<owner digest>/session.json     the browser's session (app.session)
    <work_dir>/sessions/<owner digest>/recipes.json     its saved recipes
    <work_dir>/sessions/<owner digest>/merges/<name>/   merged checkpoints (one folder per merge)
    <work_dir>/sessions/<owner digest>/searches/<name>/ search runs (checkpoint, log, recipe.yml)
    <work_dir>/exports/<random>/                      recipe YAML and checkpoint zips to download
    <work_dir>/uploads/<random>/<name>/               an export being pushed to the Hub (then removed)

Only the exports folder is served (registered with `gr.set_static_paths`, so a multi-GB zip is
served from where it was written instead of being copied into Gradio's cache), and only the app
writes into it; random folder names keep one session's downloads unguessable to another.
Checkpoints larger than `zip_limit` are not zipped: the Export tab shows their folder instead.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import time
import uuid
import zipfile
from pathlib import Path
from typing import Collection, Mapping, Optional

from mergecore.errors import MergeError
from mergecore.io.outdir import MARKER, write_marker

DEFAULT_ZIP_LIMIT = 2 * 1000**3
EXPORT_MAX_AGE = 24 * 3600  # prepared downloads are kept a day


class Workspace:
    def __init__(self, work_dir: str | Path, zip_limit: int = DEFAULT_ZIP_LIMIT):
        self.root = Path(work_dir).expanduser().resolve()
        self.exports = self.root / "exports"
        self.sessions = self.root / "sessions"
        self.zip_limit = zip_limit
        self.exports.mkdir(parents=True, exist_ok=True)
        self.sessions.mkdir(parents=True, exist_ok=True)

    def session_dir(self, session: str) -> Path:
        digest = hashlib.sha256((session or "anonymous").encode()).hexdigest()[:16]
        d = self.sessions / digest
        d.mkdir(parents=True, exist_ok=True)
        return d

    def merges_dir(self, session: str) -> Path:
        """The folder of a session's merged checkpoints (one folder per merge)."""
        d = self.session_dir(session) / "merges"
        d.mkdir(parents=True, exist_ok=True)
        return d

    def merge_dir(self, session: str, name: str, reserved: Collection[str] = ()) -> Path:
        """A fresh output path for a merge called `name` (suffixed -2, -3 ... if taken, or among
        `reserved`: the names of merges queued but not written yet); the writer creates it, with
        the marker that lets a later merge replace it."""
        clean = safe_name(name) or "merge"
        root = self.merges_dir(session)
        out, i = root / clean, 2
        while out.exists() or out.name in reserved or any(root.glob(f".{out.name}.tmp-*")):
            out = root / f"{clean}-{i}"
            i += 1
        return out

    def searches_dir(self, owner: str) -> Path:
        d = self.session_dir(owner) / "searches"
        d.mkdir(parents=True, exist_ok=True)
        return d

    def search_dir(self, owner: str, name: str, kind: Optional[str] = None) -> Path:
        """A fresh folder for a search run called `name` (name-1, name-2 ...), marked as written
        by a search of `kind` (default: `name`, the search's registered name), so the search
        resumes there and nothing else is accepted in it."""
        root = self.searches_dir(owner)
        clean = safe_name(name) or "search"
        i = 1
        while (root / f"{clean}-{i}").exists():
            i += 1
        out = root / f"{clean}-{i}"
        out.mkdir()
        write_marker(out, kind or name)
        return out

    def secret(self, name: str = "browser-state") -> str:
        """A random secret kept in the work dir (the same after a restart), e.g. for
        `gr.BrowserState`'s encryption, so a browser's stored values survive app restarts."""
        p = self.root / f".{name}.secret"
        if not p.is_file():
            tmp = p.with_suffix(f".tmp-{uuid.uuid4().hex[:6]}")
            tmp.write_text(uuid.uuid4().hex + uuid.uuid4().hex)
            tmp.chmod(0o600)
            tmp.replace(p)
        return p.read_text().strip()

    def export_dir(self) -> Path:
        self.prune_exports()
        d = self.exports / uuid.uuid4().hex
        d.mkdir(parents=True)
        return d

    def prune_exports(self, max_age: float = EXPORT_MAX_AGE) -> None:
        """Delete downloads prepared more than `max_age` seconds ago."""
        now = time.time()
        for d in self.exports.iterdir():
            try:
                if d.is_dir() and now - d.stat().st_mtime > max_age:
                    shutil.rmtree(d, ignore_errors=True)
            except OSError:
                pass

    def write_recipe(self, yaml_text: str, name: str = "recipe") -> Path:
        path = self.export_dir() / f"{safe_name(name) or 'recipe'}.yml"
        path.write_text(yaml_text)
        return path

    def zip_checkpoint(self, folder: str | Path, name: Optional[str] = None, *,
                       replace: Optional[Mapping[str, str]] = None,
                       extra: Optional[Mapping[str, Path]] = None) -> Optional[Path]:
        """Zip a merged checkpoint into the exports folder, under `<name>/`; None if it is over
        `zip_limit`. `replace`: files written with this text instead (the exported recipe and
        card); `extra`: files added (relative path -> source, e.g. artifacts)."""
        entries = export_entries(folder, replace, extra)
        if sum(size for _, _, size in entries) > self.zip_limit:
            return None
        out = self.export_dir() / f"{safe_name(name or Path(folder).name) or 'checkpoint'}.zip"
        tmp = out.with_suffix(".zip.part")
        # safetensors do not compress; store them, deflate the small text files
        with zipfile.ZipFile(tmp, "w") as zf:
            for rel, src, _ in entries:
                method = zipfile.ZIP_STORED if Path(rel).suffix in (".safetensors", ".bin") else zipfile.ZIP_DEFLATED
                if isinstance(src, Path):
                    zf.write(src, f"{out.stem}/{rel}", compress_type=method)
                else:
                    zf.writestr(f"{out.stem}/{rel}", src, compress_type=method)
        tmp.rename(out)
        return out

    def stage_checkpoint(self, folder: str | Path, name: str, *, replace: Optional[Mapping[str, str]] = None,
                         extra: Optional[Mapping[str, Path]] = None) -> Path:
        """The export of a checkpoint as a folder to upload: `<work_dir>/uploads/<random>/<name>/`
        (not served), its files hard-linked where the file system allows (copied otherwise),
        `replace` and `extra` as in `zip_checkpoint`. Remove it with `remove_staged`."""
        entries = export_entries(folder, replace, extra)
        uploads = self.root / "uploads"
        uploads.mkdir(exist_ok=True)
        for d in uploads.iterdir():  # left by a push the app did not finish (a restart)
            if d.is_dir() and time.time() - d.stat().st_mtime > EXPORT_MAX_AGE:
                shutil.rmtree(d, ignore_errors=True)
        out = uploads / uuid.uuid4().hex / (safe_name(name) or "checkpoint")
        out.mkdir(parents=True)
        for rel, src, _ in entries:
            dest = out / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            if isinstance(src, str):
                dest.write_text(src)
                continue
            try:
                os.link(src, dest)
            except OSError:
                shutil.copy2(src, dest)
        return out

    def remove_staged(self, staged: Path) -> None:
        staged = Path(staged)
        if staged.parent.parent == self.root / "uploads":
            shutil.rmtree(staged.parent, ignore_errors=True)

    def owns(self, path: str | Path) -> bool:
        try:
            Path(path).resolve().relative_to(self.root)
            return True
        except ValueError:
            return False


def export_entries(folder: str | Path, replace: Optional[Mapping[str, str]] = None,
                   extra: Optional[Mapping[str, Path]] = None) -> list[tuple[str, Path | str, int]]:
    """(relative path, source file or text, bytes) of an exported checkpoint: the folder's files
    (not the marker that says this app wrote it), `replace`'s as text, `extra` added."""
    folder = Path(folder)
    if not (folder / "config.json").is_file() and not any(folder.glob("*.safetensors")):
        raise MergeError(f"{folder} is not a merged checkpoint")
    replace, extra = dict(replace or {}), dict(extra or {})
    out: list[tuple[str, Path | str, int]] = []
    for f in sorted(folder.rglob("*")):
        rel = f.relative_to(folder).as_posix()
        if f.is_file() and rel != MARKER and rel not in replace and rel not in extra:
            out.append((rel, f, f.stat().st_size))
    out += [(rel, text, len(text.encode())) for rel, text in replace.items()]
    out += [(rel, Path(src), Path(src).stat().st_size) for rel, src in extra.items()]
    return sorted(out, key=lambda e: e[0])


def folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def safe_name(name: str) -> str:
    name = re.sub(r"[^\w.\-]+", "-", (name or "").strip()).strip(".-")
    return name[:80]
