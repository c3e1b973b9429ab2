"""The layering the architecture promises: a light ingress, model and storage code without Ray, small classes."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "diffusers", "transformers", "onnxruntime", "insightface", "cv2")
MAX_CLASS_LINES = 400


def imported_in_fresh_interpreter(module: str) -> list[str]:
    """The heavy modules that importing ``module`` loads, in a new interpreter (this one has them all)."""
    code = f"import json, sys; import {module}; print(json.dumps([m for m in {list(HEAVY)!r} if m in sys.modules]))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("module", ["serve.ingress.routes", "serve.tools.cli", "serve.config", "serve.schemas"])
def test_the_ingress_and_the_parsers_load_no_model_stack(module: str) -> None:
    """Every ingress replica imports the routes module: none of the model stack may come with it (nor with the
    command line's parser, the app config or the API's models)."""
    assert imported_in_fresh_interpreter(module) == []


def _modules(*packages: str) -> list[Path]:
    return sorted(p for package in packages for p in (ROOT / package).rglob("*.py"))


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


@pytest.mark.parametrize("package", ["deployments/instantid", "deployments/storage", "deployments/generation"])
def test_model_storage_and_flow_code_never_import_ray_or_serve(package: str) -> None:
    offending = {
        str(path.relative_to(ROOT)): sorted(n for n in _imports(path) if n.split(".")[0] in ("ray", "serve"))
        for path in _modules(package)
    }
    assert {path: names for path, names in offending.items() if names} == {}


def test_no_class_is_longer_than_a_sitting() -> None:
    long = {}
    for path in _modules("serve", "deployments"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef) and node.end_lineno - node.lineno + 1 > MAX_CLASS_LINES:
                long[f"{path.relative_to(ROOT)}:{node.name}"] = node.end_lineno - node.lineno + 1
    assert long == {}
    assert len((ROOT / "serve" / "ingress" / "routes.py").read_text().splitlines()) <= 400
