"""Where the app writes, and the files it offers for download.

    <work_dir>/sessions/<session id>/merges/<name>/   merged checkpoints (one folder per merge)
    <work_dir>/sessions/<owner id>/searches/<name>/   search runs (checkpoint, log, recipe.yml)
    <work_dir>/exports/<random>/                      recipe YAML and checkpoint zips to download

Only the exports folder is served (registered with `gr.set_static_paths`, so a multi-GB zip is
served from where it was written instead of being copied into Gradio's cache), and only the app
writes into it; random folder names keep one session's downloads unguessable to another.
Checkpoints larger than `zip_limit` are not zipped: the Export tab shows their folder instead.
"""

from __future__ import annotations

import hashlib
import re
import shutil
import time
import uuid
import zipfile
from pathlib import Path
from typing import Optional

from mergecore.errors import MergeError
from mergecore.io.outdir import write_marker

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

    def merge_dir(self, session: str, name: str) -> Path:
        """A fresh output path for a merge called `name` (suffixed -2, -3 ... if taken); the writer
        creates it, with the marker that lets a later merge replace it."""
        clean = safe_name(name) or "merge"
        root = self.session_dir(session) / "merges"
        root.mkdir(parents=True, exist_ok=True)
        out, i = root / clean, 2
        while out.exists() or any(root.glob(f".{out.name}.tmp-*")):
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

    def zip_checkpoint(self, folder: str | Path, name: Optional[str] = None) -> Optional[Path]:
        """Zip a merged checkpoint into the exports folder; None if it is over `zip_limit`."""
        folder = Path(folder)
        if not (folder / "config.json").is_file() and not any(folder.glob("*.safetensors")):
            raise MergeError(f"{folder} is not a merged checkpoint")
        size = folder_bytes(folder)
        if size > self.zip_limit:
            return None
        out = self.export_dir() / f"{safe_name(name or folder.name) or 'checkpoint'}.zip"
        tmp = out.with_suffix(".zip.part")
        # safetensors do not compress; store them, deflate the small text files
        with zipfile.ZipFile(tmp, "w") as zf:
            for f in sorted(folder.rglob("*")):
                if f.is_file():
                    method = zipfile.ZIP_STORED if f.suffix in (".safetensors", ".bin") else zipfile.ZIP_DEFLATED
                    zf.write(f, f"{out.stem}/{f.relative_to(folder)}", compress_type=method)
        tmp.rename(out)
        return out

    def owns(self, path: str | Path) -> bool:
        try:
            Path(path).resolve().relative_to(self.root)
            return True
        except ValueError:
            return False


def folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def safe_name(name: str) -> str:
    name = re.sub(r"[^\w.\-]+", "-", (name or "").strip()).strip(".-")
    return name[:80]
