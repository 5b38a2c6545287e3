"""Generate the protobuf modules from proto/, or check the committed ones are current.

Each proto file maps onto the package that owns it (protoc's ``-I<pkg path>=proto``), so
the generated ``_grpc`` modules import each other by absolute package path.
"""

from __future__ import annotations

import argparse
import filecmp
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TARGETS = {"imagescaler.proto": "api/pb", "processor.proto": "processor/pb"}


def generate(out: Path) -> None:
    """Run protoc (from grpcio-tools) for every proto file into ``out``."""
    from grpc_tools import protoc  # dev dependency: only needed here

    include = str(Path(protoc.__file__).parent / "_proto")
    for name, package in TARGETS.items():
        args = [
            "protoc",
            f"-I{package}={ROOT / 'proto'}",
            f"-I{include}",
            f"--python_out={out}",
            f"--pyi_out={out}",
            f"--grpc_python_out={out}",
            f"--plugin=protoc-gen-mypy_grpc={Path(sys.executable).parent / 'protoc-gen-mypy_grpc'}",
            f"--mypy_grpc_out={out}",
            str(ROOT / "proto" / name),
        ]
        if protoc.main(args) != 0:
            raise SystemExit(f"protoc failed for {name}")


def generated_files(base: Path) -> list[Path]:
    return sorted(
        p.relative_to(base)
        for package in TARGETS.values()
        for p in (base / package).glob("*_pb2*.py*")
    )


def check() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        fresh = Path(tmp)
        generate(fresh)
        expected, actual = generated_files(fresh), generated_files(ROOT)
        stale = [
            str(p)
            for p in expected
            if not (ROOT / p).exists() or not filecmp.cmp(fresh / p, ROOT / p, shallow=False)
        ]
        stale += [str(p) for p in actual if p not in expected]
    if stale:
        print("generated protobuf code is stale; run `make proto`:", *stale, sep="\n  ")
        return 1
    print("generated protobuf code is current")
    return 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="fail if generated code is stale")
    args = parser.parse_args()
    if args.check:
        sys.exit(check())
    generate(ROOT)


if __name__ == "__main__":
    main()
