"""Generate the gRPC stubs from proto/ (run by the package build; never edit the output by hand).

`python -m serving.codegen` writes `serving/_proto/promptier/v1/`, the stubs and a copy of the .proto
files (so that an installed package has the service definition without a checkout); `--check` exits 1
if what is there differs from what the current .proto files produce.
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "proto"
OUTPUT = Path(__file__).resolve().parent / "_proto"
PACKAGE_PREFIX = "serving._proto."


def generate(output: Path = OUTPUT) -> list[Path]:
    """Run protoc on every .proto under proto/, make the imports package-relative, and copy the .proto
    files beside the stubs."""
    from grpc_tools import protoc

    protos = sorted(PROTO_ROOT.rglob("*.proto"))
    if not protos:
        raise FileNotFoundError(f"no .proto files under {PROTO_ROOT}")
    output.mkdir(parents=True, exist_ok=True)
    include = Path(protoc.__file__).parent / "_proto"
    args = ["protoc", f"-I{PROTO_ROOT}", f"-I{include}", f"--python_out={output}", f"--pyi_out={output}",
            f"--grpc_python_out={output}", *[str(p.relative_to(PROTO_ROOT)) for p in protos]]
    if protoc.main(args) != 0:
        raise RuntimeError("protoc failed")
    written = sorted(p for p in output.rglob("*") if p.suffix in (".py", ".pyi"))
    for path in written:
        # protoc writes `from promptier.v1 import x_pb2`; the stubs live inside serving/_proto.
        text = re.sub(r"^from promptier\.", f"from {PACKAGE_PREFIX}promptier.", path.read_text(), flags=re.M)
        path.write_text(text)
    for directory in {p.parent for p in written} | {output, *output.glob("*")}:
        if directory.is_dir():
            (directory / "__init__.py").touch()
    for proto in protos:
        copy = output / proto.relative_to(PROTO_ROOT)
        copy.write_text(proto.read_text(encoding="utf-8"), encoding="utf-8")
        written.append(copy)
    return written


def proto_root() -> Path:
    """Where the .proto files are: proto/ in a checkout, else their copy installed beside the stubs."""
    return PROTO_ROOT if any(PROTO_ROOT.rglob("*.proto")) else OUTPUT


def check() -> bool:
    """True when the stubs in serving/_proto equal a fresh generation."""
    with tempfile.TemporaryDirectory() as temporary:
        fresh = Path(temporary)
        generate(fresh)
        stale = []
        for path in (p for p in fresh.rglob("*") if p.suffix in (".py", ".pyi", ".proto")):
            current = OUTPUT / path.relative_to(fresh)
            if not current.exists() or current.read_text() != path.read_text():
                stale.append(str(current.relative_to(ROOT)))
    if stale:
        print(f"stale or missing generated files: {stale}; run python -m serving.codegen", file=sys.stderr)
    return not stale


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="fail if the generated stubs are stale")
    args = parser.parse_args()
    if args.check:
        sys.exit(0 if check() else 1)
    for path in generate():
        print(path.relative_to(ROOT))


if __name__ == "__main__":
    main()
