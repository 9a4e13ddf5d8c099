"""The package's shape: every import points down, library modules import at the top, and a
run dir written by 0.1.0 still loads, scores and tells the same story."""

from __future__ import annotations

import ast
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "tinystory"
FIXTURE = Path(__file__).resolve().parent / "fixtures" / "run-0.1.0"

# Where a deferred import is the design: the CLI edge (so `tinystory --help` and tab
# completion never import torch) and the modules on `prepare`'s start-up path (a 0.4 s
# command on the bundled sample, where every import shows).
DEFERRED_OK = {"cli", "prepare", "sources", "cleaning", "packing", "encoder", "tokenizer", "data", "settings",
               "paths", "console", "errors", "net", "__init__", "__main__"}
# Optional or slow-to-import packages, imported only where they are used.
OPTIONAL = {"fastapi", "uvicorn", "starlette", "llama_cpp", "wandb"}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _type_checking_only(tree: ast.Module) -> set[int]:
    """ids of import nodes under `if TYPE_CHECKING:` (never executed: not edges)."""
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip.update(id(n) for n in ast.walk(node) if isinstance(n, (ast.Import, ast.ImportFrom)))
    return skip


def import_graph() -> dict[str, set[str]]:
    """module -> the tinystory modules it imports, anywhere in the file (function-level
    imports included), from the AST."""
    mods = modules()
    graph: dict[str, set[str]] = {}
    for name, path in mods.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        skip = _type_checking_only(tree)
        edges: set[str] = set()
        for node in ast.walk(tree):
            if id(node) in skip:
                continue
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "tinystory":
                for alias in node.names:
                    full = f"{node.module}.{alias.name}"
                    edges.add(full if full in mods else node.module)
            elif isinstance(node, ast.Import):
                edges.update(a.name for a in node.names if a.name.split(".")[0] == "tinystory")
        # the package itself holds only __version__; importing it is not an edge that can close a circle
        graph[name] = {e for e in edges if e != name and e != "tinystory"}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle as a list of modules (first == last), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt):], nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (found := visit(start)):
            return found
    return None


def test_the_import_graph_has_no_cycle() -> None:
    graph = import_graph()
    assert {"tinystory.runs", "tinystory.loading", "tinystory.scoring", "tinystory.backends"} <= set(graph)
    assert "tinystory.scoring" in graph["tinystory.evaluation"]  # the graph is real: eval scores through it
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph) or [])


def test_find_cycle_sees_a_function_level_circle() -> None:
    # guards the test above: a circle closed by an import inside a function is one too
    graph = import_graph()
    graph["tinystory.scoring"] = graph["tinystory.scoring"] | {"tinystory.evaluation"}
    cycle = find_cycle(graph)
    assert cycle is not None and cycle[0] == cycle[-1] and "tinystory.scoring" in cycle


def test_library_modules_import_at_the_top() -> None:
    late = []
    for name, path in modules().items():
        if set(name.split(".")) & DEFERRED_OK:
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for fn in ast.walk(tree):
            if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(fn):
                if isinstance(node, (ast.Import, ast.ImportFrom)):
                    target = node.module if isinstance(node, ast.ImportFrom) else node.names[0].name
                    if (target or "").split(".")[0] not in OPTIONAL:
                        late.append(f"{name}:{node.lineno} imports {target} inside {fn.name}()")
    assert late == []


# ------------------------------------------------------------------ a 0.1.0 run dir


@pytest.fixture(scope="module")
def old_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run dir exactly as tinystory 0.1.0 wrote it (tests/fixtures/run-0.1.0), copied."""
    run = tmp_path_factory.mktemp("old") / "run-0.1.0"
    shutil.copytree(FIXTURE, run)
    return run


@pytest.fixture(scope="module")
def expected() -> dict:
    return json.loads((FIXTURE.parent / "run-0.1.0.expected.json").read_text(encoding="utf-8"))


def test_a_0_1_0_run_dir_opens_as_a_run(old_run: Path) -> None:
    from tinystory.runs import Run

    run = Run.open(old_run)
    assert (run.weights, run.is_quantized, run.name) == ("fp32", False, "run-0.1.0")
    assert run.settings is not None and run.settings.model.preset == "tiny" and run.settings.train.block_size == 64
    assert run.info["tinystory_version"] == "0.1.0" and run.info["steps"] == 200
    assert run.generation_defaults == {"max_new_tokens": 64, "temperature": 1.0, "top_k": 0, "top_p": 0.9,
                                       "repetition_penalty": 1.0}
    assert run.block_size(512) == 64  # its own settings.toml, not today's default


def test_a_0_1_0_run_dir_tells_the_same_story_and_scores_the_same(old_run: Path, expected: dict,
                                                                 tmp_path: Path) -> None:
    from conftest import write_prepared

    from tinystory.cli.app import main
    from tinystory.evaluation import evaluate
    from tinystory.settings import load_settings
    from tinystory.tokenizer import load_tokenizer

    r = subprocess.run([sys.executable, "-m", "tinystory", "generate", "Once upon a time", "--run", str(old_run),
                        "--greedy", "-n", "24"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.rstrip("\n") == expected["greedy_24"]  # what 0.1.0 printed

    data = write_prepared(tmp_path / "val40", load_tokenizer(old_run), n_val=40)  # the data 0.1.0 scored
    result = evaluate(old_run, load_settings(profile="tiny", env={}), ["loss", "bpb"], data=data)
    assert result["counts"] == expected["eval_counts"]
    for key in ("loss", "bpb"):
        assert result["metrics"][key] == pytest.approx(expected["eval"][key], rel=1e-6)
    with pytest.raises(SystemExit) as e:
        main(["quantize", str(old_run), "--method", "int8", "--profile", "tiny", "--set", "quantize.val_tokens=1024",
              "--set", "generate.threads=1"])
    assert e.value.code == 0 and (old_run / "quantized" / "int8" / "model-int8.safetensors").is_file()
