"""What every tab shares: the app's context (where it writes, the jobs, the demo family, the
folders a typed path may be in) and the page (the components and the session refresh the tabs
hand each other).

Nothing here knows a tab. `app.ui` builds the page: each tab (`app.tabs.*`) creates its
components inside it and registers those another tab updates (`Page.comps`), then connects its
events; the session refresh (`Page.refresh`) is put together from each tab's part.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from mergecore.errors import MergeError

from app.demo_family import DemoFamily
from app.files import Workspace
from app.jobs import DONE, JobManager


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
        """The finished merges of a session: name -> folder, oldest first."""
        return {j.meta["name"]: Path(j.result.out_dir) for j in self.jobs.jobs(owner, kind="merge", status=DONE)}


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


def owner_of(request: Any) -> str:
    """The page session a request comes from (jobs and merges belong to it)."""
    return (getattr(request, "session_hash", None) or "anonymous") if request is not None else "anonymous"


@dataclass
class Page:
    """One page of the app, as the tabs see it while they are built and wired.

    `comps` holds the components a tab offers the others by name (e.g. 'models_status',
    'cmp_models', 'export_dd', 'tabs'). `outputs` are the components the session refresh updates
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

    @property
    def status_outputs(self) -> list[Any]:
        """The refresh's outputs and the Models tab's status line."""
        return self.outputs + [self.comps["models_status"]]

    def skip_refresh(self) -> list[Any]:
        import gradio as gr

        return [gr.skip()] * len(self.outputs)
