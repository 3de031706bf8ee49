"""Searching the Hugging Face Hub for model ids (the Models tab's Hub search): one bounded request
per search, one line when the Hub cannot be reached, and a late answer of a page's search never
overwrites a newer one of the same page (`HubSearches`). Nothing here imports Gradio."""

from __future__ import annotations

import itertools
import os
import threading
from typing import Callable, Optional

from app.demo_family import one_line

UNREACHABLE = ("ConnectError", "ConnectTimeout", "ConnectionError", "NetworkError", "TimeoutException",
               "Timeout", "TransportError", "OfflineModeIsEnabled")


def offline() -> bool:
    """Whether the Hub is off: HF_HUB_OFFLINE set now, or when huggingface_hub was imported."""
    from huggingface_hub import constants

    return os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False") or constants.is_offline_mode()


def hub_models(q: str, timeout: float) -> list[str]:
    """Model ids matching `q`, most downloaded first: ONE request to the Hub's search (no retries,
    unlike `HfApi.list_models`), bounded by `timeout` seconds. Raises what the request raised."""
    from huggingface_hub import constants
    from huggingface_hub.utils import build_hf_headers, get_session, hf_raise_for_status

    endpoint = (os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")
    r = get_session().get(f"{endpoint}/api/models", params={"search": q, "limit": 25, "sort": "downloads"},
                          headers=build_hf_headers(), timeout=timeout)
    hf_raise_for_status(r)
    return [m["id"] for m in r.json() if isinstance(m, dict) and isinstance(m.get("id"), str)]


class HubSearches:
    """The Hub searches of the pages: each is one bounded attempt (`hub_models` on a thread, waited
    for `timeout()` seconds at most), and a page's search that answers after a newer one of the same
    page started is dropped (`search` returns None), so a late answer never overwrites a newer one."""

    def __init__(self, timeout: Callable[[], float], enabled: Callable[[], bool] = lambda: True,
                 find: Callable[[str, float], list[str]] = hub_models):
        self.timeout, self.enabled, self.find = timeout, enabled, find
        self._numbers = itertools.count(1)
        self._latest: dict[str, int] = {}
        self._lock = threading.Lock()

    def search(self, owner: str, q: str) -> Optional[tuple[list[str], str, bool]]:
        """(model ids, the message, whether it worked), or None when a newer search superseded it."""
        with self._lock:
            n = self._latest[owner] = next(self._numbers)
        found = self._search((q or "").strip())
        with self._lock:
            if self._latest.get(owner) != n:
                return None
            del self._latest[owner]
            return found

    def _search(self, q: str) -> tuple[list[str], str, bool]:
        if not q:
            return [], "Type something to search for.", True
        if not self.enabled() or offline():
            return [], "The Hub search is off (offline mode); add a local folder instead.", False
        timeout = float(self.timeout())
        found: list[str] = []
        err: list[BaseException] = []

        def work() -> None:
            try:
                found.extend(self.find(q, timeout))
            except Exception as e:  # noqa: BLE001 (offline, rate-limited ...: one line)
                err.append(e)

        t = threading.Thread(target=work, name="mergecore-hub-search", daemon=True)
        t.start()
        t.join(timeout + 1.0)  # the request's own timeout ends it; this bounds the wait whatever happens
        if t.is_alive() or (err and "Timeout" in type(err[0]).__name__):
            return [], f"The Hub did not answer within {timeout:.0f} s; add a local folder instead.", False
        if err:
            names = {c.__name__ for c in type(err[0]).__mro__}
            if names & set(UNREACHABLE) or isinstance(err[0], OSError):
                return [], "The Hub cannot be reached (no network?); add a local folder instead.", False
            return [], f"Hub search failed ({one_line(err[0])[:160]}); add a local folder instead.", False
        if not found:
            return [], f"No models found for '{q}'.", True
        return found, f"{len(found)} model(s) found; pick one, then **Add model**.", True
