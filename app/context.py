"""What every tab shares: the app's context (where it writes, the jobs, the sessions on disk,
the demo family, the folders a typed path may be in), who owns a request, and the page (the
components and the session refresh the tabs hand each other).

Owners: the browser owns its session (a random key it keeps in its local storage through
`gr.BrowserState`, `Page.browser_key`), so its jobs, merges, searches and saved session belong
to `browser-<key>` and a reload or a second tab finds them. When the page opens, `app.ui`
binds the page's Gradio session to its browser (`bind_browser`); from then on `owner_of(request)`
answers the browser for that page too. A caller without a key (e.g. `gradio_client`) owns only
its own page session.

Nothing here knows a tab. `app.ui` builds the page: each tab (`app.tabs.*`) creates its
components inside it and registers those another tab updates (`Page.comps`), then connects its
events; the session refresh (`Page.refresh`) is put together from each tab's part. What a tab
does when the page opens goes through `Page.on_load`, after the browser's session is restored.
"""

from __future__ import annotations

import re
import threading
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from mergecore.errors import MergeError

from app import history
from app.demo_family import DemoFamily
from app.files import Workspace
from app.jobs import JobManager
from app.session import SessionStore

BROWSER_KEY_RE = re.compile(r"^[0-9a-f]{32}$")
MAX_BOUND_PAGES = 10_000
_PAGES: "OrderedDict[str, str]" = OrderedDict()  # Gradio session hash -> its browser's key
_PAGES_LOCK = threading.Lock()


@dataclass
class AppContext:
    """What the app needs besides the browser: where to write, the jobs, the demo family."""

    workspace: Workspace
    demo: Optional[DemoFamily] = None
    jobs: JobManager = field(default_factory=JobManager)
    hub_search: bool = True
    hub_timeout: float = 6.0
    allowed_dirs: tuple[Path, ...] = ()  # --allow-dir: more folders a typed path may be in
    demo_dir: Optional[Path] = None  # --demo-dir (None: the default demo folder)
    sessions: Optional[SessionStore] = None  # the browsers' sessions on disk (made from the workspace)

    def __post_init__(self) -> None:
        if self.sessions is None:
            self.sessions = SessionStore(self.workspace)
        store = self.sessions
        self.jobs.listeners.append(lambda event, job: history.on_job(store, event, job))
    demo_build: Any = None  # app.demo_family.DemoBuild: the demo being built in the background (the Models tab)

    def read_roots(self) -> list[Path]:
        """The folders a path typed into the app may be in (`app.paths.confine`): the work dir,
        the demo dir and the demo family's folders, the Hugging Face cache, --allow-dir."""
        from app.demo_family import demo_root
        from app.paths import hf_cache_dir

        roots = [self.workspace.root, demo_root(self.demo_dir), hf_cache_dir(), *self.allowed_dirs]
        fam = self.demo
        if fam is not None:  # where the family was built (its models' and tasks' folders)
            roots += [Path(p).parent for p in fam.models.values()]
            roots += [Path(t).parent for t in (fam.tasks, fam.val_tasks) if t]
        return roots

    def merges(self, owner: str) -> dict[str, Path]:
        """The finished merges of an owner that are on disk: name -> folder, oldest first (its
        merge history, so also those of before a reload or a restart)."""
        return history.finished(self.sessions, self.jobs, owner)


def make_context(work_dir: str | Path, demo: Optional[DemoFamily] = None, allowed_dirs: Sequence[str | Path] = (),
                 demo_dir: Optional[str | Path] = None, **kwargs: Any) -> AppContext:
    """The app's context; `allowed_dirs` (`--allow-dir`) are folders besides the work dir, the demo
    dir and the Hugging Face cache that paths typed into the app may name."""
    ws_kwargs = {k: kwargs.pop(k) for k in ("zip_limit",) if k in kwargs}
    allowed = []
    for d in allowed_dirs:
        p = Path(d).expanduser()
        if not p.is_dir():
            raise MergeError(f"--allow-dir {p}: not a folder")
        allowed.append(p.resolve())
    return AppContext(workspace=Workspace(work_dir, **ws_kwargs), demo=demo, allowed_dirs=tuple(allowed),
                      demo_dir=Path(demo_dir).expanduser() if demo_dir else None, **kwargs)


def page_of(request: Any) -> str:
    """The Gradio page session a request comes from."""
    return (getattr(request, "session_hash", None) or "anonymous") if request is not None else "anonymous"


def valid_key(key: Any) -> bool:
    return isinstance(key, str) and bool(BROWSER_KEY_RE.match(key))


def new_browser_key() -> str:
    return uuid.uuid4().hex


def bind_browser(request: Any, key: Any) -> str:
    """Remember that the page of `request` belongs to the browser with `key`; its owner."""
    if not valid_key(key):
        return page_of(request)
    page = page_of(request)
    if page != "anonymous":
        with _PAGES_LOCK:
            _PAGES[page] = key
            _PAGES.move_to_end(page)
            while len(_PAGES) > MAX_BOUND_PAGES:
                _PAGES.popitem(last=False)
    return f"browser-{key}"


def unbind_page(request: Any) -> None:
    with _PAGES_LOCK:
        _PAGES.pop(page_of(request), None)


def browser_owner(key: Any, request: Any) -> str:
    """Who owns what a request does: the browser of `key` (the page is bound to it), else the
    browser the page was bound to, else the page session itself."""
    if valid_key(key):
        return bind_browser(request, key)
    return owner_of(request)


def owner_of(request: Any) -> str:
    """Who owns what a request does: the page's browser once the page is bound to one (see
    `bind_browser`), else the page session (jobs, merges and the saved session belong to it)."""
    page = page_of(request)
    with _PAGES_LOCK:
        key = _PAGES.get(page)
    return f"browser-{key}" if key else page


@dataclass
class Page:
    """One page of the app, as the tabs see it while they are built and wired.

    `comps` holds the components a tab offers the others by name (e.g. 'models_status',
    'cmp_models', 'export_dd', 'tabs'). `load_event` is the page's first event when it opens
    (the browser's key and saved session); `on_load` runs a tab's handler after it. `outputs` are the components the session refresh updates
    and `refresh(state, form, version, request, *, key=None, group="attn", status=None)` their
    values (then the status line); `merges_outputs` / `merges_views(state, owner)` the ones that
    follow the session's list of finished merges."""

    ctx: AppContext
    blocks: Any = None
    session_state: Any = None
    form_state: Any = None
    form_version: Any = None
    browser_key: Any = None
    comps: dict[str, Any] = field(default_factory=dict)
    outputs: list[Any] = field(default_factory=list)
    refresh: Callable[..., tuple] = lambda *a, **k: ()
    merges_outputs: list[Any] = field(default_factory=list)
    merges_views: Callable[[Any, str], tuple] = lambda state, owner: ()
    load_event: Any = None

    def on_load(self, fn: Callable[..., Any], inputs: Any = None, outputs: Any = None, **kwargs: Any) -> Any:
        """Run `fn` when the page opens, once the browser's key is known and its saved session
        is in `session_state` / `form_state` (a page without that first event: on load)."""
        if self.load_event is None:
            return self.blocks.load(fn, inputs, outputs, **kwargs)
        return self.load_event.then(fn, inputs, outputs, **kwargs)

    @property
    def status_outputs(self) -> list[Any]:
        """The refresh's outputs and the Models tab's status line."""
        return self.outputs + [self.comps["models_status"]]

    def skip_refresh(self) -> list[Any]:
        import gradio as gr

        return [gr.skip()] * len(self.outputs)
