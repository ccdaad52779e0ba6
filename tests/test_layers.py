"""The package's import graph, read from the source (every import statement, function-level ones included, and the
packages an import runs first): no cycle, and no module imports one of a higher layer. The layers, lowest first:
what everything may use; plain tensors and files; optimizers; engines; stabilizers; the run; the commands."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "llmstable"

LAYERS = [  # (layer, module prefixes); a module belongs to the layer of its longest matching prefix
    ("foundation", ["llmstable", "llmstable.config", "llmstable.errors", "llmstable.progress", "llmstable.records",
                    "llmstable.schedule", "llmstable.statistics", "llmstable.speedup", "llmstable.rundir",
                    "llmstable.preemption", "llmstable.trust", "llmstable.compose", "llmstable.ranges"]),
    ("tensors", ["llmstable.rng", "llmstable.device", "llmstable.compiled", "llmstable.losses", "llmstable.snapshot",
                 "llmstable.tensorfiles", "llmstable.fingerprint", "llmstable.model", "llmstable.data",
                 "llmstable.parallel", "llmstable.parallel.world", "llmstable.parallel.dtensors", "llmstable.metrics",
                 "llmstable.checkpoint", "llmstable.indicators"]),
    ("optimizers", ["llmstable.optimizers"]),
    ("engines", ["llmstable.parallel.engines", "llmstable.parallel.build", "llmstable.parallel.deepspeed",
                 "llmstable.parallel.weights"]),
    ("stabilizers", ["llmstable.stabilizers", "llmstable.faults", "llmstable.evaluate"]),
    ("run", ["llmstable.recovery", "llmstable.checkpointer", "llmstable.resume", "llmstable.step", "llmstable.trainer",
             "llmstable.generate", "llmstable.export", "llmstable.loss_plot"]),
    ("commands", ["llmstable.cli", "llmstable.compare", "llmstable.report"]),
]


def modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def imports(name: str, path: Path, known: dict) -> set[str]:
    """The llmstable modules `name` imports anywhere in its source, with the packages each import runs first."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join([*package.split(".")[:len(package.split(".")) - node.level + 1], *filter(None, [base])])
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        for target in targets:
            parts = target.split(".")
            found.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))
    return {m for m in found if m in known and m != name and not name.startswith(m + ".")}


def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imports(name, path, known) for name, path in known.items()}


def layer(module: str) -> int:
    best = max(((i, len(p)) for i, (_, prefixes) in enumerate(LAYERS) for p in prefixes
                if module == p or module.startswith(p + ".")), key=lambda x: x[1], default=None)
    assert best is not None, f"{module} is in no layer: add it to LAYERS"
    return best[0]


def test_no_module_imports_a_higher_layer():
    upward = [f"{a} ({LAYERS[layer(a)][0]}) imports {b} ({LAYERS[layer(b)][0]})"
              for a, targets in graph().items() for b in sorted(targets) if layer(b) > layer(a)]
    assert upward == []


def test_the_import_graph_has_no_cycle():
    edges = graph()
    state: dict[str, int] = {}
    cycles = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(edges[node]):
            if state.get(nxt) == 1:
                cycles.append(" -> ".join([*path[path.index(nxt):], nxt]))
            elif nxt not in state:
                visit(nxt, [*path, nxt])
        state[node] = 2

    for start in sorted(edges):
        if start not in state:
            visit(start, [start])
    assert cycles == []
