"""DESIGN.md's import direction and the ``kernels`` name clash, checked in
fresh interpreters so nothing already imported hides a violation."""
from __future__ import annotations

import subprocess
import sys

import pytest

from tests.conftest import REPO


def modules_after(import_line: str) -> set[str]:
    code = f"import sys; {import_line}; print('\\n'.join(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    return set(out.stdout.split())


@pytest.mark.parametrize("line", [
    "import sampler.reference, sampler.block_diffusion, sampler.params",
    "import kernels.ops, kernels.reference",
])
def test_sampler_and_kernels_never_import_server(line):
    assert not {m for m in modules_after(line) if m == "server" or m.startswith("server.")}


def test_scheduler_and_params_are_torch_free():
    loaded = modules_after("import server.engine.scheduler, server.engine.request, sampler.params, server.config")
    assert "torch" not in loaded


def test_api_layer_is_torch_free():
    loaded = modules_after("import server.api.app, server.api.launch, server.api.serving, server.engine.async_engine")
    assert "torch" not in loaded and "transformers" not in loaded


def test_nothing_imports_tests_or_benchmarks():
    for pkg in ("server", "sampler", "kernels"):
        for path in (REPO / pkg).rglob("*.py"):
            text = path.read_text()
            assert "import tests" not in text and "from tests" not in text, path
            assert "import benchmarks" not in text and "from benchmarks" not in text, path


def test_transformers_does_not_take_our_kernels_for_hf_kernels():
    code = ("import kernels, transformers.utils.import_utils as u; "
            "assert not hasattr(kernels, '__version__'); print(u.is_kernels_available())")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_api_reaches_the_engine_only_through_its_client_surface():
    """server/api sees the engine as AsyncEngine's small surface (facts,
    validate, submit, abort, ready/dead/queue state): never the LLMEngine it
    runs on its own thread, nor that engine's scheduler, runner or model."""
    import ast
    import re

    surface = {"facts", "validate", "validate_likelihood", "submit", "submit_likelihood", "abort", "is_ready",
               "is_dead", "num_waiting", "max_queued_requests", "for_model"}
    for path in sorted((REPO / "server" / "api").glob("*.py")):
        text = path.read_text()
        assert "LLMEngine" not in text and "server.engine.engine" not in text, path
        assert not re.search(r"\.engine\.engine\b|\.(scheduler|runner)\b", text), path
        for node in ast.walk(ast.parse(text)):
            # x.engine.<attr> and self.engine.<attr>: only the surface
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Attribute) \
                    and node.value.attr == "engine":
                assert node.attr in surface, f"{path.name}: .engine.{node.attr}"
