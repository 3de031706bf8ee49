"""Bounded YAML loading: every YAML a user hands us (recipes, tasks files, search configs,
uploads in the app) is read through `load_yaml` / `load_yaml_file`.

Three limits keep a small hostile file from taking the process down:

* size: at most `MAX_YAML_BYTES` (10 MB), checked before a byte is parsed;
* expansion: aliases (`*a`) are shared, not copied, by the parser, but everything that walks the
  result (validation, error messages) sees the expanded tree; a 546-byte "billion laughs" file
  expands to billions of nodes. The composed node graph is measured first and refused past
  `MAX_EXPANDED_NODES` nodes or `MAX_DEPTH` levels; a structure that contains itself is refused;
* encoding: UTF-8 only, with the offending byte position in the error.

Errors are `MergeError`s naming the file and, for syntax errors, the line and column.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from mergecore.errors import MergeError

MAX_YAML_BYTES = 10 * 1000**2
MAX_EXPANDED_NODES = 200_000
MAX_DEPTH = 64


def _measure(root: yaml.Node, where: str) -> None:
    """Expanded node count and depth of a composed YAML graph, without expanding it."""
    size: dict[int, int] = {}
    depth: dict[int, int] = {}
    on_path: set[int] = set()
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, done = stack.pop()
        key = id(node)
        children: list[yaml.Node] = []
        if isinstance(node, yaml.SequenceNode):
            children = list(node.value)
        elif isinstance(node, yaml.MappingNode):
            children = [n for pair in node.value for n in pair]
        if done:
            on_path.discard(key)
            size[key] = 1 + sum(size[id(c)] for c in children)
            depth[key] = 1 + max((depth[id(c)] for c in children), default=0)
            if size[key] > MAX_EXPANDED_NODES:
                raise MergeError(f"{where}: YAML expands to more than {MAX_EXPANDED_NODES} values "
                                 f"(aliases repeated inside aliases?); refused")
            if depth[key] > MAX_DEPTH:
                raise MergeError(f"{where}: YAML is nested more than {MAX_DEPTH} levels deep; refused")
            continue
        if key in size:
            continue
        if key in on_path:
            raise MergeError(f"{where}: YAML structure contains itself (a recursive alias); refused")
        on_path.add(key)
        stack.append((node, True))
        stack.extend((c, False) for c in children if id(c) not in size)


def _syntax_error(err: yaml.YAMLError, where: str) -> MergeError:
    if isinstance(err, yaml.MarkedYAMLError):
        mark = err.problem_mark or err.context_mark
        pos = f" line {mark.line + 1}, column {mark.column + 1}:" if mark else ""
        return MergeError(f"{where}:{pos} malformed YAML: {_clip_problem(err.problem or err.context)}")
    return MergeError(f"{where}: malformed YAML: {_clip_problem(str(err))}")


def _clip_problem(text: object) -> str:
    """PyYAML's problem text quotes names from the file (aliases, tags) unbounded: keep it short."""
    text = " ".join(str(text).split())
    return text if len(text) <= 100 else text[:97] + "..."


def load_yaml(text: str | bytes, where: str = "YAML") -> Any:
    """Parse one YAML document (plain data only: `yaml.SafeLoader`) within the limits above."""
    if isinstance(text, bytes):
        if len(text) > MAX_YAML_BYTES:
            raise MergeError(f"{where}: {len(text)} bytes is over the {MAX_YAML_BYTES // 1000**2} MB limit for YAML")
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as err:
            raise MergeError(f"{where}: not UTF-8 text (invalid byte at position {err.start})") from None
    elif len(text) > MAX_YAML_BYTES:
        raise MergeError(f"{where}: {len(text)} characters is over the {MAX_YAML_BYTES // 1000**2} MB limit for YAML")
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _measure(node, where)
        return loader.construct_document(node)
    except yaml.YAMLError as err:
        raise _syntax_error(err, where) from None
    except RecursionError:
        raise MergeError(f"{where}: YAML is nested too deeply; refused") from None
    finally:
        loader.dispose()


def load_yaml_file(path: str | Path, what: str = "file") -> Any:
    """Read and parse a YAML file; the size is checked before it is read."""
    p = Path(path).expanduser()
    try:
        if not p.is_file():
            raise MergeError(f"{what} not found: {p}" + ("" if p.is_absolute() else f" (looked in {Path.cwd()})"))
        size = p.stat().st_size
        if size > MAX_YAML_BYTES:
            raise MergeError(f"{p}: {size} bytes is over the {MAX_YAML_BYTES // 1000**2} MB limit for YAML")
        data = p.read_bytes()
    except OSError as err:
        raise MergeError(f"cannot read {what} {p}: {err.strerror or err}") from None
    return load_yaml(data, str(p))
