"""Import direction of fer_lightning (issue 13): each package imports only itself and packages before it.

ORDER, top (imported by all) to bottom (imports the others):

    core -> formats -> data -> metrics -> models -> training -> tracking -> evaluation
         -> inference -> explore -> runs -> bench -> cli

The modules still live flat in fer_lightning/ while they move; PACKAGE_OF says which package each flat module
belongs to, so the rule already holds for them. Every import of fer_lightning.* counts, function-local ones
included (they hid the cycles). KNOWN_UPWARD and KNOWN_CYCLES are the debt left from before this test: the
test fails on any new upward import or cycle, and also on a listed entry that is gone (delete it then), so the
lists only shrink.
"""

from __future__ import annotations

import ast
from pathlib import Path

ORDER = [
    "core",
    "formats",
    "data",
    "metrics",
    "models",
    "training",
    "tracking",
    "evaluation",
    "inference",
    "explore",
    "runs",
    "bench",
    "cli",
]

# flat module (or subpackage) -> package of ORDER it belongs to
PACKAGE_OF = {
    "__init__": "core",
    "errors": "core",
    "config": "core",
    "config_dir": "core",
    "taxonomy": "core",
    "formats": "formats",
    "data": "data",
    "metrics": "metrics",
    "models": "models",
    "losses": "models",
    "mixing": "models",
    "tta": "models",
    "ema": "models",
    "schedules": "training",
    "checkpoints": "training",
    "tracking": "tracking",
    "mlflow_retry": "tracking",
    "mlflow_spool": "tracking",
    "mlflow_store": "tracking",
    "evaluate": "evaluation",
    "eval_artifacts": "evaluation",
    "bias": "evaluation",
    "report": "evaluation",
    "baselines": "evaluation",
    "plots": "evaluation",
    "predict": "inference",
    "export": "inference",
    "face_detect": "inference",
    "explore": "explore",
    "explore_figures": "explore",
    "explore_html": "explore",
    "explore_stats": "explore",
    "train": "runs",
    "resume": "runs",
    "last_checkpoint": "runs",
    "slurm": "runs",
    "distributed": "runs",
    "sweep": "runs",
    "kfold": "runs",
    "bench": "bench",
    "cli": "cli",
    "conf": "core",
}

# (importer module, imported module) that point upward today
KNOWN_UPWARD: set[tuple[str, str]] = {
    ("fer_lightning.config", "fer_lightning.data.sampling"),  # validation of sampling options: move to data/
    ("fer_lightning.config", "fer_lightning.losses"),  # validate_loss_config: a validate step above models
    ("fer_lightning.data.datamodule", "fer_lightning.kfold"),  # fold_records: a records function, to data/
    ("fer_lightning.evaluate", "fer_lightning.train"),  # build_module and friends: to training/builders
    ("fer_lightning.explore", "fer_lightning.train"),  # data_fingerprint / run naming: to tracking/
    ("fer_lightning.formats.affectnet", "fer_lightning.data.records"),  # records schema: to core/records
    ("fer_lightning.formats.registry", "fer_lightning.data.records"),
}
# each cycle as the sorted tuple of its modules (strongly connected component)
KNOWN_CYCLES: set[tuple[str, ...]] = {
    ("fer_lightning.data.datamodule", "fer_lightning.kfold", "fer_lightning.sweep", "fer_lightning.train"),
}

PKG_ROOT = Path(__file__).resolve().parents[1] / "fer_lightning"


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__" and len(parts) > 1:
        parts = parts[:-1]
    return ".".join(parts)


def imports_of(source: str, module: str, is_package: bool) -> set[str]:
    """Every fer_lightning.* name the source imports, at any depth, relative imports resolved."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == "fer_lightning")
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".") if is_package else module.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "fer_lightning":
                continue
            found.add(target)
            # `from fer_lightning.data import records` imports the submodule records
            found.update(f"{target}.{a.name}" for a in node.names if a.name != "*")
    return found


def collect(root: Path) -> dict[str, set[str]]:
    """Module -> the fer_lightning modules it imports (names that are not modules fall back to their module)."""
    files = {module_name(p, root): p for p in sorted(root.rglob("*.py"))}
    graph: dict[str, set[str]] = {}
    for mod, path in files.items():
        raw = imports_of(path.read_text(), mod, path.name == "__init__.py")
        targets = set()
        for name in raw:
            while name not in files and "." in name:
                name = name.rsplit(".", 1)[0]
            if name in files and name != mod:
                targets.add(name)
        graph[mod] = targets
    return graph


def package_of(module: str, mapping: dict[str, str]) -> str:
    parts = module.split(".")
    key = parts[1] if len(parts) > 1 else "__init__"
    return mapping.get(key, key)


def upward_imports(graph: dict[str, set[str]], order: list[str], mapping: dict[str, str]) -> set[tuple[str, str]]:
    rank = {p: i for i, p in enumerate(order)}
    bad = set()
    for mod, targets in graph.items():
        src = package_of(mod, mapping)
        for t in targets:
            dst = package_of(t, mapping)
            if src not in rank or dst not in rank or rank[dst] > rank[src]:
                bad.add((mod, t))
    return bad


def cycles(graph: dict[str, set[str]]) -> set[tuple[str, ...]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: set[tuple[str, ...]] = set()

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.add(tuple(sorted(comp)))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_every_module_has_a_package():
    graph = collect(PKG_ROOT)
    unknown = sorted({package_of(m, PACKAGE_OF) for m in graph} - set(ORDER))
    assert not unknown, f"modules without a package in ORDER: {unknown}"


def test_no_new_upward_import():
    bad = upward_imports(collect(PKG_ROOT), ORDER, PACKAGE_OF)
    assert sorted(bad - KNOWN_UPWARD) == [], "upward imports (see ORDER at the top of this file)"
    assert sorted(KNOWN_UPWARD - bad) == [], "fixed: delete these from KNOWN_UPWARD"


def test_no_new_import_cycle():
    found = cycles(collect(PKG_ROOT))
    assert sorted(found - KNOWN_CYCLES) == [], "import cycles between modules"
    assert sorted(KNOWN_CYCLES - found) == [], "fixed: delete these from KNOWN_CYCLES"


def test_checker_reports_upward_import_and_cycle(tmp_path):
    root = tmp_path / "fer_lightning"
    (root / "core").mkdir(parents=True)
    (root / "data").mkdir()
    (root / "__init__.py").write_text("")
    (root / "core" / "__init__.py").write_text("")
    (root / "data" / "__init__.py").write_text("")
    (root / "data" / "records.py").write_text("from ..core import errors\n")
    # upward, hidden inside a function, and closing a cycle with data.records
    (root / "core" / "errors.py").write_text("def f():\n    from fer_lightning.data.records import x\n")
    graph = collect(root)
    assert graph["fer_lightning.data.records"] == {"fer_lightning.core", "fer_lightning.core.errors"}
    mapping = {"core": "core", "data": "data", "__init__": "core"}
    assert upward_imports(graph, ["core", "data"], mapping) == {
        ("fer_lightning.core.errors", "fer_lightning.data.records")
    }
    assert cycles(graph) == {("fer_lightning.core.errors", "fer_lightning.data.records")}
