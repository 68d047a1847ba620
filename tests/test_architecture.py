"""The layering of shared/DESIGN.md, checked on the source: `jobs -> {serve, cil_platform} -> gmm_model`, serve uses
only cil_platform's storage, paths and config, no import cycles, and the modules that must stay light stay light."""
from __future__ import annotations

import ast
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("gmm_model", "cil_platform", "serve", "jobs", "gmm_cil_cli")
# what serve may use of the platform: where versions live, the repository's own paths, the config parser
SERVE_MAY_USE = ("cil_platform.storage", "cil_platform.paths", "cil_platform.config")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_modules() -> dict[str, Path]:
    return {module_name(p): p for package in PACKAGES for p in (REPO / package).rglob("*.py")}


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """Every project module `name` imports anywhere in its file (module level, functions, TYPE_CHECKING blocks):
    `from a.b import c` counts as a.b.c when that is a module, else as a.b."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            targets = [f"{source}.{alias.name}" if f"{source}.{alias.name}" in modules else source
                       for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in modules:  # `import a.b.c` of a name inside a module: its module
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    modules = project_modules()
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
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


def test_the_graph_sees_known_edges(graph):
    """The walker itself: relative, absolute and from-package imports are all found (else the checks prove nothing)."""
    assert "cil_platform.storage" in graph["cil_platform.storage.store"]  # from . import open_storage
    assert "cil_platform.training.session" in graph["cil_platform.experiment"]  # from .training.session import ...
    assert "gmm_model.classify" in graph["cil_platform.evaluation"]  # absolute
    assert "cil_platform.experiment" in graph["jobs.incremental"]


def test_no_import_cycles(graph):
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_a_planted_cycle_is_found():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]


def test_dependencies_point_one_way(graph):
    upward = {(m, t) for m, targets in graph.items() for t in targets
              if m.startswith(("gmm_model", "cil_platform")) and t.startswith(("serve", "jobs"))}
    assert not upward, f"the model and platform must not import serving or jobs: {sorted(upward)}"
    model_to_platform = {(m, t) for m, targets in graph.items() for t in targets
                         if m.startswith("gmm_model") and not t.startswith("gmm_model")}
    assert not model_to_platform, sorted(model_to_platform)
    serve_to_platform = {(m, t) for m, targets in graph.items() for t in targets
                         if m.startswith("serve") and t.startswith("cil_platform") and not t.startswith(SERVE_MAY_USE)}
    assert not serve_to_platform, sorted(serve_to_platform)


def test_one_repo_root():
    defined = [str(p.relative_to(REPO)) for package in PACKAGES for p in (REPO / package).rglob("*.py")
               if any(isinstance(n, ast.Assign) and any(getattr(t, "id", None) == "REPO_ROOT" for t in n.targets)
                      for n in ast.walk(ast.parse(p.read_text())))]
    assert defined == ["cil_platform/paths.py"]


def loaded_after(statement: str) -> set[str]:
    """Which of torch / transformers a fresh interpreter has loaded after running `statement`."""
    probe = f"import sys\n{statement}\nprint(sorted(m for m in ('torch', 'transformers') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    return set(ast.literal_eval(out.stdout.strip().splitlines()[-1]))


def test_a_config_validates_without_loading_torch_or_transformers():
    assert loaded_after("from cil_platform.config import load_config\nassert load_config().eval.rules") == set()


def test_what_ray_train_unpickles_does_not_load_transformers():
    """Ray Train's controller imports the worker body's module to unpickle it: a model import there costs every fit."""
    assert "transformers" not in loaded_after("import cil_platform.training.worker")


def test_what_a_feature_read_task_imports_loads_neither_torch_nor_transformers():
    """Ray Data's read tasks run in fresh worker processes: importing the model stack there cost 10-20 s per read."""
    assert loaded_after("import cil_platform.feature_cache") == set()


@pytest.mark.parametrize("script", sorted(p.name for p in (REPO / "jobs").glob("*.py") if p.name != "__init__.py"))
def test_every_job_script_imports(script):
    """A job's imports run only when it is submitted: a name that moved must fail here, not on a cluster."""
    spec = importlib.util.spec_from_file_location(f"job_{script[:-3]}", REPO / "jobs" / script)
    spec.loader.exec_module(importlib.util.module_from_spec(spec))  # its main() is behind `if __name__ == ...`
