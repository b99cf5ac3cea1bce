"""The shape of the package, measured: modules, import links, cycles, upward imports, Store's size, the
modules a vector query enters, ``Any`` count. Issue 23's before/after figures come from this script.

    python benchmarks/architecture.py [--query]

Upward imports are counted against LAYERS (lowest first): a module may import its own package and any
package below it, and a package's face (its ``__init__``) from anywhere.
"""

from __future__ import annotations

import argparse
import ast
import re
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "mrlstore"
# Lowest first, above the top-level helpers (errors, kernels, _fsutil...), which form the bottom layer. The
# package's faces (``mrlstore``, and the entry points ``mrlstore.ray`` and ``__main__``) sit above them all.
LAYERS = ["tiers", "results", "inputs", "encoder", "options", "query", "write", "upkeep", "store", "integrations"]
ENTRY_POINTS = {"mrlstore.ray", "mrlstore.__main__"}


def module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(path: Path, name: str) -> set[str]:
    """mrlstore modules ``path`` imports, at any depth (function-level imports included)."""
    tree = ast.parse(path.read_text())
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("mrlstore")}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join([*base, node.module] if node.module else base)
            elif node.module and node.module.startswith("mrlstore"):
                target = node.module
            else:
                continue
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                found.add(sub if (PACKAGE.parent / (sub.replace(".", "/") + ".py")).exists()
                          or (PACKAGE.parent / sub.replace(".", "/")).is_dir() else target)  # fmt: skip
    return {m for m in found if m != name}


def graph() -> dict[str, set[str]]:
    modules = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}
    return {name: {m for m in imports_of(p, name) if m in modules} for name, p in modules.items()}


def faces(g: dict[str, set[str]]) -> set[str]:
    return {m for m in g if (PACKAGE.parent / m.replace(".", "/") / "__init__.py").exists()}


def cycles(g: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), over the links between modules:
    a package face (``__init__``) re-exports what lies below it, so links into faces are left out."""
    skip = faces(g)
    g = {v: {w for w in deps if w not in skip} for v, deps in g.items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in g[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    sys.setrecursionlimit(10000)
    for v in g:
        if v not in index:
            visit(v)
    return out


def layer(module: str) -> int:
    parts = module.split(".")
    if len(parts) == 1 or module in ENTRY_POINTS:
        return len(LAYERS) + 1  # the package's faces, above everything
    return LAYERS.index(parts[1]) + 1 if parts[1] in LAYERS else 0


def upward(g: dict[str, set[str]]) -> list[tuple[str, str]]:
    """Imports of a module in a higher layer that is not a package face (its ``__init__``)."""
    skip = faces(g)
    return sorted((a, b) for a, deps in g.items() for b in deps if b not in skip and layer(b) > layer(a))


def store_size() -> tuple[int, int]:
    text = (PACKAGE / "store.py").read_text()
    tree = ast.parse(text)
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "Store")
    methods = [n for n in cls.body if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)]
    return len(text.splitlines()), len({m.name for m in methods})


def query_modules() -> tuple[list[str], list[tuple[str, str]]]:
    """The mrlstore modules whose functions run during one vector query, from Store.query on, in order; and
    the calls from a module into one of a higher layer (the path climbing back up)."""
    import tempfile

    import numpy as np

    import mrlstore

    with tempfile.TemporaryDirectory() as tmp:
        store = mrlstore.open(Path(tmp) / "s", dim=64, bands=[16, 64], index_dims=[16])
        rng = np.random.default_rng(0)
        store.add_vectors(rng.standard_normal((2000, 64)).astype(np.float32))
        vector = rng.standard_normal(64).astype(np.float32)
        store.query(vector, dims=[16, 64])
        seen: list[str] = []
        climbs: list[tuple[str, str]] = []

        def profile(frame, event, arg):  # noqa: ANN001 - sys.setprofile's signature
            if event == "call":
                mod = frame.f_globals.get("__name__", "")
                caller = frame.f_back.f_globals.get("__name__", "") if frame.f_back else ""
                if mod.startswith("mrlstore") and (not seen or seen[-1] != mod):
                    seen.append(mod)
                if mod.startswith("mrlstore") and caller.startswith("mrlstore") and layer(mod) > layer(caller):
                    climbs.append((caller, mod))

        sys.setprofile(profile)
        store.query(vector, dims=[16, 64])
        sys.setprofile(None)
        store.close()
    return seen, climbs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--query", action="store_true", help="also trace the modules a vector query enters")
    args = parser.parse_args()
    g = graph()
    files = list(PACKAGE.rglob("*.py"))
    any_count = sum(len(re.findall(r"\bAny\b", p.read_text())) for p in files)
    lines, methods = store_size()
    print(f"files: {len(files)} ({len({p.parent for p in files})} folders)")
    print(f"import links: {sum(len(v) for v in g.values())}")
    found = cycles(g)
    print(f"cycles: {len(found)} {found}")
    up = upward(g)
    print(f"upward imports: {len(up)} {up}")
    print(f"store.py: {lines} lines, Store: {methods} methods")
    print(f"Any: {any_count}")
    if args.query:
        seen, climbs = query_modules()
        entered = list(dict.fromkeys(seen))
        print(f"vector query: {len(entered)} modules entered: {' -> '.join(entered)}")
        print(f"calls into a higher layer: {len(climbs)} {sorted(set(climbs))}")


if __name__ == "__main__":
    main()
