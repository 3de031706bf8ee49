"""Push a prepared checkpoint folder to the Hugging Face Hub (`huggingface_hub.create_repo` +
`upload_folder`), with a token from `HF_TOKEN` or the stored login.

Every failure is one line for the Export tab: no token (how to log in), a repository id that is
not `org/name`, the Hub unreachable ("nothing was uploaded"), a refused token or repository.
`huggingface_hub` is looked up at call time, so tests replace its functions. Nothing here
imports Gradio.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Callable, Optional

from mergecore.errors import MergeError

REPO_ID_RE = re.compile(r"^[A-Za-z0-9](?:[\w.\-]{0,94}[A-Za-z0-9_])?/[A-Za-z0-9_.](?:[\w.\-]{0,94}[\w])?$")
LOGIN_HINT = ("no Hugging Face token: run `hf auth login` where the app runs (or set HF_TOKEN), then push again; "
              "nothing was uploaded")


def check_repo_id(text: Optional[str]) -> str:
    """The repository id as typed, checked: `org/name` (letters, digits, '-', '_', '.')."""
    repo = (text or "").strip()
    if not repo:
        raise MergeError("give the repository as org/name (e.g. your-name/my-merge)")
    if not REPO_ID_RE.match(repo) or "--" in repo or ".." in repo or repo.endswith(".git"):
        shown = repo if len(repo) <= 60 else repo[:57] + "..."
        raise MergeError(f"'{shown}' is not a Hub repository id: use org/name (letters, digits, '-', '_', '.'; "
                         f"no '--' or '..')")
    return repo


def hub_token() -> str:
    """HF_TOKEN, else the token `hf auth login` stored; MergeError (how to log in) when neither."""
    token = os.environ.get("HF_TOKEN", "").strip()
    if not token:
        try:
            import huggingface_hub

            token = (huggingface_hub.get_token() or "").strip()
        except Exception:  # an unreadable token file: as if there were none
            token = ""
    if not token:
        raise MergeError(LOGIN_HINT)
    return token


def hub_error(err: BaseException, created: bool = False) -> str:
    """One line for a failed push."""
    nothing = "the repository exists but nothing was uploaded" if created else "nothing was uploaded"
    if _is_network_error(err):
        return f"could not reach the Hugging Face Hub ({type(err).__name__}); {nothing}"
    status = getattr(getattr(err, "response", None), "status_code", None)
    first = (str(err).strip().splitlines() or [""])[0][:200]
    if status in (401, 403):
        return (f"the Hub refused the token ({status}{': ' + first if first else ''}); log in again with "
                f"`hf auth login` or set HF_TOKEN to a token that may write there; {nothing}")
    return f"the Hub push failed ({type(err).__name__}{': ' + first if first else ''}); {nothing}"


def _is_network_error(err: BaseException) -> bool:
    names = {c.__name__ for c in type(err).__mro__}
    if names & {"ConnectionError", "ConnectError", "Timeout", "TimeoutException", "TimeoutError",
                "OfflineModeIsEnabled", "NetworkError", "ProxyError", "SSLError"}:
        return True
    cause = err.__cause__ or err.__context__
    return cause is not None and cause is not err and _is_network_error(cause)


def push_folder(folder: str | Path, repo_id: str, *, private: bool, token: str,
                log: Callable[[str], None] = lambda line: None) -> str:
    """Create `repo_id` (if new; `private` as asked) and upload every file of `folder` in one
    commit; the repository's URL. Raises MergeError (one line) on failure."""
    import huggingface_hub

    folder = Path(folder)
    files = sorted(f for f in folder.rglob("*") if f.is_file())
    size = sum(f.stat().st_size for f in files)
    created = False
    try:
        log(f"creating {repo_id} on the Hub ({'private' if private else 'public'}; kept if it exists) ...")
        url = huggingface_hub.create_repo(repo_id, private=private, exist_ok=True, token=token, repo_type="model")
        created = True
        log(f"uploading {len(files)} files ({size / 1e6:.1f} MB) from {folder.name} ...")
        info = huggingface_hub.upload_folder(repo_id=repo_id, folder_path=str(folder), token=token, repo_type="model",
                                             commit_message=f"Upload {folder.name} (merged with mergecore)")
    except MergeError:
        raise
    except Exception as err:  # network, refused token, HTTP errors: one line, never a traceback
        raise MergeError(hub_error(err, created)) from None
    commit = getattr(info, "oid", None)
    link = str(getattr(url, "url", None) or url or f"https://huggingface.co/{repo_id}")
    log(f"uploaded to {link}" + (f" (commit {str(commit)[:10]})" if commit else ""))
    return link
