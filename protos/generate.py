"""Regenerate Python code from .proto files, or check that the committed copy is fresh.

    python protos/generate.py --out generated --root protos FILE...         # write
    python protos/generate.py --check --out generated --root protos FILE... # compare only

Output: `_pb2.py` messages, `_pb2.pyi` typed stubs (mypy-protobuf), `_pb2_grpc.py` stubs and
`_pb2_grpc.pyi`, plus an `__init__.py` in every package directory. Generation happens in a
temporary directory, so a check never touches the tree and a write removes stale files.
"""

from __future__ import annotations

import argparse
import filecmp
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path


def _plugin(name: str) -> str:
    found = shutil.which(name, path=str(Path(sys.executable).parent))
    if not found:
        sys.exit(f"{name} not found next to {sys.executable}; run `make install`")
    return found


def generate(root: Path, includes: list[Path], files: list[str], out: Path) -> None:
    """Run protoc (from grpcio-tools) with the python, grpc and mypy plugins into `out`."""
    args = [
        sys.executable,
        "-m",
        "grpc_tools.protoc",
        f"-I{root}",
        *(f"-I{inc}" for inc in includes),
        f"--plugin=protoc-gen-mypy={_plugin('protoc-gen-mypy')}",
        f"--plugin=protoc-gen-mypy_grpc={_plugin('protoc-gen-mypy_grpc')}",
        f"--python_out={out}",
        f"--grpc_python_out={out}",
        f"--mypy_out=quiet:{out}",
        f"--mypy_grpc_out=quiet:{out}",
        *(str(Path(f).relative_to(root)) for f in files),
    ]
    subprocess.run(args, check=True)
    for directory, _, _ in os.walk(out):
        if Path(directory) != out:
            (Path(directory) / "__init__.py").touch()


def differences(left: Path, right: Path) -> list[str]:
    """Relative paths that differ, exist only on one side, recursively."""
    cmp = filecmp.dircmp(left, right, ignore=["__pycache__"])
    return list(_walk(cmp, Path()))


def _walk(cmp: filecmp.dircmp[str], rel: Path):  # type: ignore[no-untyped-def]
    for name in cmp.left_only + cmp.right_only + cmp.diff_files + cmp.funny_files:
        yield str(rel / name)
    for name, sub in cmp.subdirs.items():
        yield from _walk(sub, rel / name)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--root", type=Path, required=True)
    parser.add_argument("--include", type=Path, action="append", default=[])
    parser.add_argument("--check", action="store_true")
    parser.add_argument("files", nargs="*")
    ns = parser.parse_args()
    if not ns.files:
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        fresh = Path(tmp)
        generate(ns.root, ns.include, ns.files, fresh)
        if ns.check:
            stale = differences(fresh, ns.out) if ns.out.exists() else ["(missing)"]
            if stale:
                print(f"{ns.out} is stale; run `make protos`:", *stale, sep="\n  ")
                return 1
            return 0
        if ns.out.exists():
            shutil.rmtree(ns.out)
        shutil.copytree(fresh, ns.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
