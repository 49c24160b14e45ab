"""The dependency picture of docs/architecture.md and the walls of DESIGN.md, checked on the source.

Every `import` in jaxllm/ and torch_ref/ counts, module level or inside a function (a lazy import
is still a dependency): the graph of project modules must have no cycle, and these walls hold:

- torch_ref imports nothing from jaxllm (an independent reference);
- jaxllm.model imports only itself, jaxllm.config and jaxllm.errors (config -> model -> the rest);
- jaxllm.config and jaxllm.errors import no other project module but errors;
- inference (decode, sample) does not import the training loop;
- torch is imported only where a user asks for torch (the torch engine, `--to torch`, peer
  benchmarks), and only inside functions: `import jaxllm.<anything>` works without PyTorch;
- grain and wandb (absent from the GPU image) are imported only inside functions;
- scripts/*.py are thin: a few lines over `jaxllm.cli`.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("jaxllm", "torch_ref")
TORCH_ALLOWED = ("jaxllm.sample", "jaxllm.convert.cli", "jaxllm.benchmarks.train", "jaxllm.benchmarks.decode")
LAZY_ONLY = ("torch", "grain", "wandb", "transformers")


def module_files() -> dict[str, Path]:
    out = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


MODULES = module_files()


def imports_of(name: str, path: Path) -> list[tuple[str, bool]]:
    """(imported module, at module level?) for every import statement of a module. `from a import b`
    names the module a.b when that is a module of the project, else a."""
    tree = ast.parse(path.read_text(), str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    top_level = {id(node) for node in tree.body}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, id(node) in top_level) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1] + ([base] if base else []))
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                found.append((sub if sub in MODULES else base, id(node) in top_level))
    return found


GRAPH = {name: {m for m, _ in imports_of(name, path) if m in MODULES and m != name} for name, path in MODULES.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the graph as a path [a, b, ..., a], or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_walk_sees_every_module_and_known_edges():
    """The walk itself works: it finds modules and edges that certainly exist."""
    assert {"jaxllm.model.transformer", "jaxllm.model.losses", "torch_ref.model", "jaxllm.errors"} <= set(GRAPH)
    assert "jaxllm.model.transformer" in GRAPH["jaxllm.model.losses"]
    assert "jaxllm.model.diffusion" in GRAPH["jaxllm.model.losses"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycle():
    cycle = find_cycle(GRAPH)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def _violations(prefix: str, allowed) -> list[str]:
    return [f"{name} imports {dep}" for name, deps in sorted(GRAPH.items()) if name == prefix or
            name.startswith(prefix + ".") for dep in sorted(deps) if not allowed(dep)]


def test_torch_ref_imports_nothing_from_jaxllm():
    assert _violations("torch_ref", lambda dep: dep.startswith("torch_ref")) == []


def test_the_model_imports_only_config_errors_and_itself():
    allowed = lambda dep: dep.startswith("jaxllm.model") or dep in ("jaxllm.config", "jaxllm.errors")  # noqa: E731
    assert _violations("jaxllm.model", allowed) == []


def test_config_and_errors_sit_at_the_bottom():
    assert GRAPH["jaxllm.errors"] == set()
    assert GRAPH["jaxllm.config"] <= {"jaxllm.errors"}


@pytest.mark.parametrize("module", ["jaxllm.decode", "jaxllm.sample"])
def test_inference_does_not_import_the_training_loop(module):
    assert "jaxllm.train.loop" not in GRAPH[module]


def test_heavy_optional_packages_are_imported_lazily_and_torch_only_where_asked_for():
    problems = []
    for name, path in MODULES.items():
        if not name.startswith("jaxllm"):
            continue
        for module, top_level in imports_of(name, path):
            root = module.split(".")[0]
            if root in LAZY_ONLY and top_level:
                problems.append(f"{name} imports {module} at module level")
            if root == "torch" or module.startswith("torch_ref"):
                if not name.startswith(TORCH_ALLOWED):
                    problems.append(f"{name} imports {module}")
    assert problems == []


@pytest.mark.parametrize("script", sorted((ROOT / "scripts").glob("*.py")), ids=lambda p: p.name)
def test_scripts_are_thin_wrappers_over_the_cli(script):
    tree = ast.parse(script.read_text())
    imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    imported |= {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    assert imported <= {"sys", "jaxllm.cli"}, imported
    assert len(script.read_text().splitlines()) <= 12
