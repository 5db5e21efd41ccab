"""The container images, checked without a Docker daemon: what they copy
exists and survives .dockerignore, the install lines are the README's, and
the entrypoint, flags, port, health check and user agree with the server."""
from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest

from tests.conftest import REPO
from tests.deploy.conftest import DOCKERFILES, parse_serve_args, serve_flags

IDS = [p.name for p in DOCKERFILES]


def instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out, current = [], ""
    for line in dockerfile.read_text().splitlines():
        if not current and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.rstrip().endswith("\\"):
            current += line.rstrip()[:-1] + " "
            continue
        current += line
        word, _, rest = current.strip().partition(" ")
        out.append((word.upper(), rest.strip()))
        current = ""
    return out


def args_of(dockerfile: Path, instruction: str) -> list[str]:
    return [rest for word, rest in instructions(dockerfile) if word == instruction]


def exec_form(dockerfile: Path, instruction: str) -> list[str]:
    (rest,) = args_of(dockerfile, instruction)
    return json.loads(rest)


def glob_regex(pattern: str) -> str:
    regex = re.escape(pattern).replace(r"\*\*/", "(.*/)?").replace(r"\*\*", ".*")
    return regex.replace(r"\*", "[^/]*").replace(r"\?", "[^/]").replace(r"\[", "[").replace(r"\]", "]")


def dockerignore_excludes(path: str) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parents wins."""
    excluded = False
    parts = path.split("/")
    candidates = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    for line in (REPO / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        regex = glob_regex(line.lstrip("!").strip("/"))
        if any(re.fullmatch(regex, c) for c in candidates):
            excluded = not negate
    return excluded


def readme_torch_pin() -> str:
    text = (REPO / "README.md").read_text()
    block = text.split("<!-- ci:test -->", 1)[1]
    return re.search(r"torch==([0-9][\w.]*)", block).group(1)


def pip_installs(dockerfile: Path) -> list[list[str]]:
    """The arguments of every `pip install` in a RUN."""
    found = []
    for run in args_of(dockerfile, "RUN"):
        for command in re.split(r"&&|;", run):
            words = shlex.split(command)
            if words[:2] == ["pip", "install"]:
                found.append(words[2:])
    return found


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=IDS)
def test_every_copy_source_exists_and_is_in_the_build_context(dockerfile):
    copies = args_of(dockerfile, "COPY")
    assert copies
    for copy in copies:
        *sources, _ = [w for w in shlex.split(copy) if not w.startswith("--")]
        for source in sources:
            path = REPO / source
            assert path.exists(), f"COPY {source}: missing"
            files = [path] if path.is_file() else [f for f in path.rglob("*") if f.is_file()]
            for f in files:
                rel = f.relative_to(REPO).as_posix()
                if "__pycache__" not in rel:
                    assert not dockerignore_excludes(rel), f"{rel} is copied but .dockerignore excludes it"


def test_dockerignore_keeps_the_package_and_drops_the_rest():
    for kept in ("pyproject.toml", "README.md", "server/__main__.py", "server/assets/llada-demo/config.json",
                 "sampler/params.py", "kernels/reference.py"):
        assert not dockerignore_excludes(kept), kept
    for dropped in (".git/HEAD", ".tools/bin/helm", "tests/conftest.py", "benchmarks/RESULTS.md",
                    "server/__pycache__/config.cpython-312.pyc", "sampler/stray.pyc", "llada_serve.egg-info/PKG-INFO", ".venv/bin/python"):
        assert dockerignore_excludes(dropped), dropped


def test_every_data_file_the_server_reads_ships_as_package_data():
    """The images install the project non-editable (pip install .): a file
    under server/ that is not package data is missing in the container."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10: pytest depends on tomli there
        import tomli as tomllib

    package_data = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    globs = [f"{package.replace('.', '/')}/{g}" for package, gs in package_data.items() for g in gs]
    assert "server/assets/**/*" in globs  # the bundled demo model
    for f in (REPO / "server").rglob("*"):
        rel = f.relative_to(REPO).as_posix()
        if f.is_file() and f.suffix not in (".py", ".pyc") and "__pycache__" not in rel:
            assert any(re.fullmatch(glob_regex(g), rel) for g in globs), \
                f"{rel} is not package data: add it to [tool.setuptools.package-data] in pyproject.toml"


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=IDS)
def test_entrypoint_port_healthcheck_and_user(dockerfile):
    assert exec_form(dockerfile, "ENTRYPOINT") == ["llada-serve"]
    assert args_of(dockerfile, "EXPOSE") == ["8000"]
    (health,) = args_of(dockerfile, "HEALTHCHECK")
    assert "/live" in health and "'8000'" in health
    (user,) = args_of(dockerfile, "USER")
    uid, _, gid = user.partition(":")
    assert uid.isdigit() and int(uid) != 0 and gid.isdigit() and int(gid) != 0  # numeric: runAsNonRoot can verify
    assert f"--uid {uid}" in " ".join(args_of(dockerfile, "RUN"))


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=IDS)
def test_cmd_and_env_flags_exist_and_parse(dockerfile):
    cmd = exec_form(dockerfile, "CMD")
    assert cmd[0] == "serve"
    flags = [a.split("=", 1)[0] for a in cmd[1:] if a.startswith("--")]
    assert set(flags) <= serve_flags(), set(flags) - serve_flags()
    args = parse_serve_args(cmd[1:])
    assert args.host == "0.0.0.0" and args.port == 8000
    env = " ".join(args_of(dockerfile, "ENV"))
    for name in re.findall(r"\bLLADA_SERVE_([A-Z_]+)=", env):
        assert "--" + name.lower().replace("_", "-") in serve_flags(), name
    # a `docker run IMAGE --model X` replaces CMD: the image still listens on all interfaces
    assert "LLADA_SERVE_HOST=0.0.0.0" in env


def test_cpu_image_installs_as_the_readme_says():
    pin = f"torch=={readme_torch_pin()}"
    cpu_torch, project = pip_installs(DOCKERFILES[1])
    # PyPI's Linux torch wheel is the CUDA build: the CPU index's +cpu build satisfies the pin first
    assert cpu_torch == ["--index-url", "https://download.pytorch.org/whl/cpu", pin]
    assert project == [pin, "."]  # README: pip install torch==X -e .


def test_gpu_image_installs_as_the_readme_says():
    (install,) = pip_installs(DOCKERFILES[0])
    assert install == [".[triton]"]  # torch unpinned: pip resolves the CUDA build
    (base,) = [a for a in args_of(DOCKERFILES[0], "ARG") if a.startswith("BASE_IMAGE=")]
    assert base.startswith("BASE_IMAGE=nvidia/cuda:")
    assert "gcc" in " ".join(args_of(DOCKERFILES[0], "RUN"))  # Triton builds its launchers at run time
