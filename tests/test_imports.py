"""The package's imports point one way: no module reaches, directly or through others (function-level
imports included), back into one that imports it. Core code (decoding, the drafter) knows nothing of the
tooling (CLIs, offline models, training)."""

from __future__ import annotations

import ast
import configparser
from pathlib import Path

import hf_ddtree

SRC = Path(hf_ddtree.__file__).resolve().parent


def _modules() -> dict[str, Path]:
    out = {}
    for path in SRC.rglob("*.py"):
        parts = path.relative_to(SRC.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def import_graph() -> dict[str, set[str]]:
    """{module: the hf_ddtree modules it imports anywhere in its body}."""
    mods = _modules()
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for name, path in mods.items():
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            targets: list[str] = []
            if isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = package
                    for _ in range(node.level - 1):
                        up = up.rsplit(".", 1)[0]
                    base = up + ("." + node.module if node.module else "")
                for alias in node.names:
                    full = f"{base}.{alias.name}"
                    targets.append(full if full in mods else base)
            elif isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            graph[name] |= {t for t in targets if t in mods and t != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycles():
    assert cycles(import_graph()) == []


def test_the_cycle_finder_finds_one():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_core_does_not_import_tooling():
    graph = import_graph()
    tooling = {m for m in graph if m.startswith(("hf_ddtree.cli", "hf_ddtree.training", "hf_ddtree.bench",
                                                 "hf_ddtree.models", "hf_ddtree.data", "hf_ddtree.draft_vocab"))}
    for core in ("hf_ddtree.decoding", "hf_ddtree.drafter", "hf_ddtree.drafter.vocab", "hf_ddtree.propose",
                 "hf_ddtree.verify", "hf_ddtree.tree", "hf_ddtree.cache"):
        assert not graph[core] & tooling, (core, graph[core] & tooling)


def test_version_matches_setup_cfg():
    cfg = configparser.ConfigParser()
    cfg.read(SRC.parents[1] / "setup.cfg")
    assert hf_ddtree.__version__ == cfg["metadata"]["version"]
