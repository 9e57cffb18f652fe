"""The import contract of rft's top-level packages, checked on the real import graph.

The packages are layered, each importing only from layers below it:

    core  <-  weight_sync  <-  learner | rollout_workers  <-  reward_workers  <-  services

- nothing below `services` imports `services`, and `core` imports no other rft package;
- a package imports nothing from a higher layer, and the two packages of one layer nothing from
  each other (so the package graph is a DAG);
- no import cycle among rft's modules (A imports B imports ... A).

"Imports" means every `import` statement, inside functions too (a deferred import still ties the
packages together); grimp (the graph engine of import-linter) finds them. Only the cycle checks leave
out imports under `if TYPE_CHECKING:`, which never run. The checker is tried on small synthetic
packages at the end, so a green run here cannot come from a checker that sees nothing.
"""

from __future__ import annotations

import graphlib
import textwrap
from dataclasses import dataclass
from pathlib import Path

import grimp
import pytest

REPO = Path(__file__).resolve().parents[2]
# Lowest first; the packages of one layer are independent of each other.
LAYERS: tuple[tuple[str, ...], ...] = (
    ("core",),
    ("weight_sync",),
    ("learner", "rollout_workers"),
    ("reward_workers",),
    ("services",),
)
PACKAGES = tuple(package for layer in LAYERS for package in layer)
TOP, LEAF = LAYERS[-1][0], LAYERS[0][0]


# ---------------------------------------------------------------- the checker


@dataclass(frozen=True)
class Import:
    importer: str
    imported: str
    line_number: int
    line: str

    def __str__(self) -> str:
        return f"{self.importer} (line {self.line_number}: {self.line}) imports {self.imported}"


def top_package(module: str) -> str:
    return module.split(".", 1)[0]


def build_graph(packages: tuple[str, ...], with_type_checking: bool) -> grimp.ImportGraph:
    # cache_dir=None: no .grimp_cache left in the working directory
    return grimp.build_graph(
        *packages,
        include_external_packages=False,
        exclude_type_checking_imports=not with_type_checking,
        cache_dir=None,
    )


def imports_between(
    graph: grimp.ImportGraph, importers: tuple[str, ...] | list[str], imported: tuple[str, ...] | list[str]
) -> list[Import]:
    """Every import statement in a module of the `importers` packages of a module of the `imported` ones."""
    found = []
    for module in sorted(graph.modules):
        if top_package(module) not in importers:
            continue
        for target in sorted(graph.find_modules_directly_imported_by(module)):
            if top_package(target) in imported:
                for detail in graph.get_import_details(importer=module, imported=target):
                    found.append(Import(module, target, detail["line_number"], detail["line_contents"]))
    return found


def layer_violations(graph: grimp.ImportGraph, layers: tuple[tuple[str, ...], ...]) -> list[Import]:
    """Imports of a package from a higher layer, or from another package of its own layer."""
    violations = []
    for index, layer in enumerate(layers):
        for package in layer:
            higher = [p for upper in layers[index + 1 :] for p in upper]
            forbidden = higher + [p for p in layer if p != package]
            violations += imports_between(graph, [package], forbidden)
    return violations


def find_cycles(edges: dict[str, set[str]], limit: int = 20) -> list[list[str]]:
    """Cycles of a directed graph, each as [a, b, ..., a]: graphlib names one per CycleError; that
    cycle's last edge is dropped and the search repeats, so each independent cycle is named."""
    edges = {node: set(targets) for node, targets in edges.items()}
    cycles = []
    while len(cycles) < limit:
        try:
            graphlib.TopologicalSorter(edges).prepare()
            return cycles
        except graphlib.CycleError as e:
            cycle = e.args[1]  # [n0, n1, ..., n0] where each node is a predecessor of the one before
            cycle = cycle[::-1]  # in import order: n0 imports n1 imports ... n0
            cycles.append(cycle)
            edges[cycle[-2]].discard(cycle[-1])
    return cycles


def module_edges(graph: grimp.ImportGraph) -> dict[str, set[str]]:
    return {module: set(graph.find_modules_directly_imported_by(module)) for module in graph.modules}


def package_edges(graph: grimp.ImportGraph) -> dict[str, set[str]]:
    edges: dict[str, set[str]] = {}
    for module, targets in module_edges(graph).items():
        package = top_package(module)
        edges.setdefault(package, set()).update(t for t in map(top_package, targets) if t != package)
    return edges


def describe_cycle(graph: grimp.ImportGraph, cycle: list[str], of_packages: bool = False) -> str:
    """a -> b -> a, with the lines of each import (for a package cycle: one import per edge)."""
    steps = []
    for importer, imported in zip(cycle, cycle[1:]):
        if of_packages:
            where = f"e.g. {imports_between(graph, [importer], [imported])[0]}"
        else:
            details = graph.get_import_details(importer=importer, imported=imported)
            where = ", ".join(f"line {d['line_number']}: {d['line_contents']}" for d in details)
        steps.append(f"  {importer} -> {imported}   ({where})")
    return " -> ".join(cycle) + "\n" + "\n".join(steps)


def report(title: str, items: list) -> str:
    return f"{title}:\n" + "\n".join(f"  {item}" for item in items)


# ---------------------------------------------------------------- the contract on rft


@pytest.fixture(scope="module")
def graph() -> grimp.ImportGraph:
    """Every import, under `if TYPE_CHECKING:` too."""
    return build_graph(PACKAGES, with_type_checking=True)


@pytest.fixture(scope="module")
def runtime_graph() -> grimp.ImportGraph:
    """The imports that run: those under `if TYPE_CHECKING:` left out."""
    return build_graph(PACKAGES, with_type_checking=False)


def test_every_top_level_package_is_in_a_layer():
    on_disk = {p.parent.name for p in REPO.glob("*/__init__.py")} - {"tests"}
    assert on_disk == set(PACKAGES), (
        f"top-level packages not placed in LAYERS: {sorted(on_disk - set(PACKAGES))}; "
        f"in LAYERS but gone: {sorted(set(PACKAGES) - on_disk)}"
    )


def test_the_graph_sees_function_level_imports(graph):
    # services/cli/main.py imports the driver inside `rft run` only (typer must start fast)
    assert graph.direct_import_exists(importer="services.cli.main", imported="services.orchestrator.driver")


def test_nothing_below_services_imports_services(graph):
    below = [p for p in PACKAGES if p != TOP]
    violations = imports_between(graph, below, [TOP])
    assert not violations, report(f"{TOP} is the top layer; these modules below it import it", violations)


def test_core_imports_no_other_rft_package(graph):
    violations = imports_between(graph, [LEAF], [p for p in PACKAGES if p != LEAF])
    assert not violations, report(
        f"{LEAF} is the leaf of rft; these modules of it import other rft packages", violations
    )


def test_packages_import_only_lower_layers(graph):
    violations = layer_violations(graph, LAYERS)
    order = "  <-  ".join(" | ".join(layer) for layer in LAYERS)
    assert not violations, report(
        f"layers (lowest first: {order}); imports upward or across a layer", violations
    )


def test_no_module_import_cycle(runtime_graph):
    cycles = find_cycles(module_edges(runtime_graph))
    assert not cycles, report(
        "import cycles among rft's modules", [describe_cycle(runtime_graph, cycle) for cycle in cycles]
    )


def test_package_graph_is_a_dag(runtime_graph):
    cycles = find_cycles(package_edges(runtime_graph))
    assert not cycles, report(
        "import cycles among rft's top-level packages",
        [describe_cycle(runtime_graph, cycle, of_packages=True) for cycle in cycles],
    )


# ---------------------------------------------------------------- the checker can fail


def write_tree(root: Path, files: dict[str, str]) -> None:
    for relative, source in files.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(source))


@pytest.fixture
def synthetic(tmp_path, monkeypatch):
    """Write packages under tmp_path (importable, not imported: grimp reads the source)."""
    monkeypatch.syspath_prepend(str(tmp_path))

    def make(files: dict[str, str]) -> None:
        write_tree(tmp_path, files)

    return make


def test_checker_finds_module_and_package_cycles(synthetic):
    synthetic(
        {
            "cyc_low/__init__.py": "",
            "cyc_low/a.py": "import cyc_low.b\n",
            "cyc_low/b.py": """\
            def later():
                from cyc_low import a  # inside a function: still a cycle
            """,
            # under TYPE_CHECKING: never runs, so no cycle
            "cyc_low/c.py": """\
            from typing import TYPE_CHECKING
            if TYPE_CHECKING:
                import cyc_low.d
            """,
            "cyc_low/d.py": "import cyc_low.c\n",
            "cyc_low/e.py": "from cyc_high import f\n",
            "cyc_high/__init__.py": "",
            "cyc_high/f.py": "import cyc_low.e\n",
        }
    )
    graph = build_graph(("cyc_low", "cyc_high"), with_type_checking=False)
    cycles = {frozenset(cycle) for cycle in find_cycles(module_edges(graph))}
    assert cycles == {frozenset({"cyc_low.a", "cyc_low.b"}), frozenset({"cyc_low.e", "cyc_high.f"})}
    text = describe_cycle(graph, find_cycles(module_edges(graph))[0])
    assert "cyc_low" in text and "line" in text
    package_cycles = find_cycles(package_edges(graph))
    assert [set(cycle) for cycle in package_cycles] == [{"cyc_low", "cyc_high"}]
    text = describe_cycle(graph, package_cycles[0], of_packages=True)
    assert "cyc_low.e (line 1: from cyc_high import f) imports cyc_high.f" in text
    assert "cyc_high.f (line 1: import cyc_low.e) imports cyc_low.e" in text
    # counted with the TYPE_CHECKING import, c and d would form a cycle
    with_tc = build_graph(("cyc_low", "cyc_high"), with_type_checking=True)
    assert frozenset({"cyc_low.c", "cyc_low.d"}) in {frozenset(c) for c in find_cycles(module_edges(with_tc))}


def test_checker_finds_upward_and_sideways_imports(synthetic):
    synthetic(
        {
            "up_leaf/__init__.py": "",
            "up_leaf/ok.py": "import os\n",
            "up_leaf/bad.py": """\
            def deferred():  # inside a function: still upward
                import up_top.app
            """,
            "up_left/__init__.py": "import up_leaf.ok\n",
            "up_left/x.py": "from up_right import y\n",  # across one layer
            "up_right/__init__.py": "",
            "up_right/y.py": "import up_leaf.ok\n",
            "up_top/__init__.py": "",
            "up_top/app.py": "import up_left.x\nimport up_right.y\n",
        }
    )
    layers = (("up_leaf",), ("up_left", "up_right"), ("up_top",))
    graph = build_graph(tuple(p for layer in layers for p in layer), with_type_checking=True)
    upward = imports_between(graph, ["up_leaf", "up_left", "up_right"], ["up_top"])
    assert [str(i) for i in upward] == ["up_leaf.bad (line 2: import up_top.app) imports up_top.app"]
    assert [(i.importer, i.imported) for i in layer_violations(graph, layers)] == [
        ("up_leaf.bad", "up_top.app"),
        ("up_left.x", "up_right.y"),
    ]
    # the upward import closes a package cycle as well: up_leaf -> up_top -> (up_left|up_right) -> up_leaf
    cycles = find_cycles(package_edges(graph))
    assert cycles and all({"up_leaf", "up_top"} <= set(cycle) for cycle in cycles)
