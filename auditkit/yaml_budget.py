"""YAML from other people's files at a bounded cost: a size cap on the file, a budget on what aliases expand to.

safe_load refuses code, not size. An alias repeats a whole subtree by reference, so nine nested lists of nine
aliases (a "billion laughs") are a 1 kB file that the parser holds in a few hundred nodes but every later walk
over the value (validation, copying, an error message) visits 9^9 times: gigabytes and minutes. Aliases are
allowed (sharing a settings block is a fair use), but the document's expanded size is counted on the composed
node graph, before anything is built from it, and refused beyond MAX_NODES.
"""
from __future__ import annotations

from pathlib import Path

import yaml

from .errors import AuditkitError

MAX_BYTES = 1 << 20  # 1 MiB: a policy or model.yaml is a few kB
MAX_NODES = 10_000  # scalars, lists and mappings after expanding aliases; paper.yaml has about 100


def read_text(path: Path, what: str) -> str:
    """The file's UTF-8 text; AuditkitError when missing, unreadable, not text or over MAX_BYTES."""
    try:
        with open(path, "rb") as fh:
            data = fh.read(MAX_BYTES + 1)
    except FileNotFoundError:
        raise AuditkitError(f"{what} not found", where=str(path)) from None
    except OSError as err:
        raise AuditkitError(f"cannot read {what}: {err.strerror or err}", where=str(path)) from None
    if len(data) > MAX_BYTES:
        raise AuditkitError(f"{what} is larger than {MAX_BYTES >> 20} MiB; refusing to parse it", where=str(path))
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data[:err.start].count(b"\n") + 1
        raise AuditkitError(f"{what} is not UTF-8 text", where=f"{path}:{line}") from None


def check_expanded_size(node: yaml.Node | None, source: str) -> None:
    """AuditkitError when the document, with every alias expanded, has more than MAX_NODES nodes, or when an
    alias refers to a node that contains it (a cycle). Iterative, memoised per node: linear in the graph."""
    if node is None:
        return
    sizes: dict[int, int] = {}
    open_nodes: set[int] = set()
    stack = [(node, False)]
    while stack:
        current, children_done = stack.pop()
        key = id(current)
        if children_done:
            open_nodes.discard(key)
            sizes[key] = 1 + sum(sizes[id(c)] for c in _children(current))
            if sizes[key] > MAX_NODES:
                line = current.start_mark.line + 1
                raise AuditkitError(f"YAML aliases expand this document beyond {MAX_NODES} values; refusing it "
                                    "(an alias bomb?)", where=f"{source}:{line}")
            continue
        if key in sizes:
            continue
        if key in open_nodes:
            raise AuditkitError("a YAML alias refers to a node that contains it",
                                where=f"{source}:{current.start_mark.line + 1}")
        open_nodes.add(key)
        stack.append((current, True))
        stack.extend((c, False) for c in _children(current) if id(c) not in sizes)


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    if isinstance(node, yaml.MappingNode):
        return [n for pair in node.value for n in pair]
    return []
