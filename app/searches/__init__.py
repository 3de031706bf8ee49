"""The searches the Search tab runs: a small registry; each entry is a form, a runner and plots.

The Search tab knows nothing about any one search. It draws the form of the chosen entry, runs
it as a background job (`app.jobs`, kind 'search') and redraws its plots from the job's events
on every poll. `app.searches.base` says what a search registers (`SearchSpec`); one module per
search registers it, in the tab's dropdown in this order: RMM (`rmm`, over
`mergecore.search.rmm`), DAM (`dam`: trained merge coefficients, or layer-wise AdaMerging) and
the evolutionary search (`evo`: CMA-ES over a recipe template's parameters), then the
leaderboard (`leaderboard`: every data-free merge and the searches ranked on validation in a
time budget, with a live table of the ranking). A resumed run starts with the engine's replay
of its checkpointed history, so its plots start from the beginning. `app.searches.runs` starts,
resumes and replays them as jobs.
"""

from __future__ import annotations

from app.searches.base import (
    SEARCHES, Field, PlotSpec, SearchSession, SearchSpec, TableSpec, add_operator, default_operators, field_default,
    get_search, operator_entry, operator_methods, operators_yaml, parse_operators, register_search, search_names,
    starting_method,
)
from app.searches.rmm import RMM, merging_map
from app.searches.dam import DAM
from app.searches.evo import EVO, default_bounds, evo_methods, parse_bounds
from app.searches.leaderboard import LEADERBOARD


__all__ = [
    "DAM", "EVO", "LEADERBOARD", "RMM", "SEARCHES", "Field", "PlotSpec", "SearchSession", "SearchSpec", "TableSpec",
    "add_operator",
    "default_bounds", "default_operators", "evo_methods", "field_default", "get_search",
    "merging_map", "operator_entry", "operator_methods", "operators_yaml", "parse_operators", "parse_bounds",
    "register_search", "search_names", "starting_method",
]
