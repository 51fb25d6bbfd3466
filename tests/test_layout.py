"""The layout's rules (issue 20), read off the source: no import circle in pipelines/, the core imports nothing
above it, nothing at run time imports recipe/, the UI imports no torch-level library, every file is readable in
one sitting; and the studio starts and generates with recipe/ gone."""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
MAX_LINES = 450
TORCH_LEVEL = {"torch", "torchvision", "diffusers", "transformers", "peft", "accelerate", "safetensors",
               "controlnet_aux", "huggingface_hub"}


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """Every module `path` imports, anywhere in it (deferred imports inside functions too), absolute."""
    package = _module_name(path) if path.name == "__init__.py" else _module_name(path).rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            found.add(module)
            found |= {f"{module}.{alias.name}" for alias in node.names}
    return found


def _sources(folder: str) -> list[Path]:
    return sorted((ROOT / folder).rglob("*.py"))


def _pipeline_graph() -> dict[str, set[str]]:
    """pipelines' modules -> the pipelines modules each imports (a name imported from a package counts as the
    package's module when it is one, else the package itself)."""
    modules = {_module_name(path): path for path in _sources("pipelines")}
    graph = {}
    for name, path in modules.items():
        targets = set()
        for imported in _imports(path):
            while imported and imported not in modules:
                imported = imported.rpartition(".")[0]
            if imported and imported != name and not name.startswith(imported + "."):
                targets.add(imported)
        graph[name] = targets
    return graph


def test_no_import_circle_in_pipelines():
    graph = _pipeline_graph()
    circles = []

    def visit(node, path, on_path, done):
        on_path.add(node)
        path.append(node)
        for target in sorted(graph[node]):
            if target in on_path:
                circles.append(path[path.index(target):] + [target])
            elif target not in done:
                visit(target, path, on_path, done)
        path.pop()
        on_path.discard(node)
        done.add(node)

    done: set[str] = set()
    for module in sorted(graph):
        if module not in done:
            visit(module, [], set(), done)
    assert not circles, "import circles: " + "; ".join(" -> ".join(circle) for circle in circles)


def test_the_core_imports_nothing_above_it():
    graph = _pipeline_graph()
    above = {module: sorted(target for target in targets if not target.startswith("pipelines.core"))
             for module, targets in graph.items() if module.startswith("pipelines.core")}
    assert not {module: targets for module, targets in above.items() if targets}


@pytest.mark.parametrize("folder", ["pipelines", "studio"])
def test_nothing_at_run_time_imports_recipe(folder):
    offenders = [str(path.relative_to(ROOT)) for path in _sources(folder)
                 if any(name == "recipe" or name.startswith("recipe.") for name in _imports(path))]
    assert offenders == [], "recipe/ trains the shipped models; the app must run without it"
    assert not any("recipe" in name.split(".")[0] for name in _imports(ROOT / "launch.py"))


def test_the_ui_imports_no_torch_level_library():
    offenders = {str(path.relative_to(ROOT)): sorted({name.split(".")[0] for name in _imports(path)} & TORCH_LEVEL)
                 for path in _sources("studio")}
    assert {path: names for path, names in offenders.items() if names} == {}, \
        "studio/ hands typed requests to pipelines/, which holds all the torch"


def test_every_file_reads_in_one_sitting():
    long = {str(path.relative_to(ROOT)): count for folder in ("pipelines", "studio") for path in _sources(folder)
            if (count := len(path.read_text().splitlines())) > MAX_LINES}
    assert long == {}, f"files over {MAX_LINES} lines"


BLOCK_RECIPE = textwrap.dedent("""
    import importlib.abc, sys

    class NoRecipe(importlib.abc.MetaPathFinder):
        attempts = []

        def find_spec(self, name, path=None, target=None):
            if name == "recipe" or name.startswith("recipe."):
                self.attempts.append(name)
                raise ImportError(f"{name} is not shipped with the app")
            return None

    sys.meta_path.insert(0, NoRecipe())
""")

GENERATE = textwrap.dedent("""
    import json, socket, sys
    from pathlib import Path

    import launch

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    args = launch.parse_args(["--device", "cpu", "--port", str(port), "--outputs", sys.argv[1]])
    app, context = launch.build(args)
    launch.start(app, context, args)
    from gradio_client import Client
    client = Client(f"http://127.0.0.1:{port}/", verbose=False)
    gallery, infotext, status, job_id, *_ = client.predict(prompt="red apple", steps=2, seed=5, api_name="/txt2img")
    print("REPORT", json.dumps({"infotext": infotext, "saved": [str(p) for p in Path(sys.argv[1]).rglob("*.png")],
                      "recipe_attempts": NoRecipe.attempts,
                      "recipe_loaded": [name for name in sys.modules if name.split(".")[0] == "recipe"]}))
    app.close()
""")


@pytest.mark.slow
def test_the_studio_starts_and_generates_without_recipe(tmp_path):
    """A copy of the app without recipe/ (and any import of it refused, since the editable install could still find
    the checkout's) launches as `python launch.py` does and generates with the embedded model."""
    import json

    app = tmp_path / "app"
    app.mkdir()
    for name in ("pipelines", "studio"):
        shutil.copytree(ROOT / name, app / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "launch.py", app / "launch.py")
    (app / "assets").symlink_to(ROOT / "assets", target_is_directory=True)
    (app / "run.py").write_text(BLOCK_RECIPE + GENERATE)
    assert not (app / "recipe").exists()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False", "PYTHONPATH": str(app)}
    done = subprocess.run([sys.executable, "run.py", str(tmp_path / "outputs")], cwd=app, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(next(line for line in done.stdout.splitlines() if line.startswith("REPORT "))[7:])
    assert report["recipe_attempts"] == [] and report["recipe_loaded"] == []
    assert "Seed: 5" in report["infotext"] and "Model: embedded" in report["infotext"]
    assert len(report["saved"]) == 1 and Path(report["saved"][0]).is_relative_to(tmp_path / "outputs")
