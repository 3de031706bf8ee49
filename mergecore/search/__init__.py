"""Merge searches: RMM (`rmm/`), DAM (`dam/`), the evolutionary search (`evo/`) and the leaderboard
(`leaderboard/`: every data-free merge and the searches, ranked in a time budget), each a `Search`
that runs through the one program in `mergecore.search.base`:

    from mergecore.search.base import read_events, run_search, search_class
    from mergecore.search.config import load_config
    from mergecore.search.report import event_line

    cls = search_class("rmm")                                # or "dam", "evo"
    config, root = load_config("rmm.yml", cls.config_class)   # paths relative to the config's folder
    summary = run_search(cls(config, root), "out/", on_event=lambda e: print(event_line(e) or ""),
                         replay=True)                         # out/model, scored: summary["replay"], ["final"]
    events = read_events("out/")                              # every event of every run, from out/events.jsonl

`run_rmm`, `run_dam` and `run_evo` (in each kind's `run` module) are the same call for one kind.
"""
