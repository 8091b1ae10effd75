"""Build-time guard for the worker image's PyTorch step (infra/worker.Dockerfile).

    python3 check_torch_build.py snapshot BEFORE.json
    pip install --index-url https://download.pytorch.org/whl/cu128 torch==X+cu128 torchvision==Y+cu128
    python3 check_torch_build.py verify BEFORE.json --torch X+cu128 --torchvision Y+cu128 --cuda 12.8

`verify` fails the build (one line, exit 1) unless exactly the pinned torch/torchvision builds are installed,
torch was built for the expected CUDA version, and the PyTorch index added or changed nothing but torch,
torchvision and the CUDA runtime wheels they pin (so no other dependency came from a second index).
Standard library only: it runs before anything else is importable.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from importlib import metadata
from pathlib import Path

FROM_TORCH_INDEX = re.compile(r"(torch|torchvision|triton|nvidia-[a-z0-9-]+|cuda-[a-z0-9-]+)")


def installed() -> dict[str, str]:
    """Name (normalised) -> version of every distribution in this environment."""
    found: dict[str, str] = {}
    for dist in metadata.distributions():
        name = re.sub(r"[-_.]+", "-", dist.metadata["Name"]).lower()
        found[name] = dist.version
    return found


def problems(before: dict[str, str], torch_version: str, torchvision_version: str, cuda: str) -> list[str]:
    """What is wrong with the environment after the PyTorch step (empty when all is as pinned)."""
    now = installed()
    found = []
    for name, expected in (("torch", torch_version), ("torchvision", torchvision_version)):
        if now.get(name) != expected:
            found.append(f"{name} {now.get(name, 'missing')} is installed, expected {expected}")
    changed = sorted(name for name, version in now.items() if before.get(name) != version)
    foreign = [f"{name}=={now[name]}" for name in changed if not FROM_TORCH_INDEX.fullmatch(name)]
    if foreign:
        found.append(f"the PyTorch index step installed other packages: {', '.join(foreign)} (add them to the lock)")
    if not found:
        import torch  # only once the versions are right: importing a wrong build can fail for other reasons

        built_for = torch.version.cuda or "none"  # None: a CPU-only build
        if built_for != cuda:
            found.append(f"torch is built for CUDA {built_for}, expected {cuda}")
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    snapshot = sub.add_parser("snapshot", help="record the installed distributions")
    snapshot.add_argument("path", type=Path)
    verify = sub.add_parser("verify", help="check the PyTorch step against a snapshot")
    verify.add_argument("path", type=Path)
    verify.add_argument("--torch", required=True)
    verify.add_argument("--torchvision", required=True)
    verify.add_argument("--cuda", required=True, help="torch.version.cuda expected, e.g. 12.8")
    args = parser.parse_args(argv)
    if args.command == "snapshot":
        args.path.write_text(json.dumps(installed(), sort_keys=True))
        return 0
    found = problems(json.loads(args.path.read_text()), args.torch, args.torchvision, args.cuda)
    if found:
        print("torch build check failed: " + "; ".join(found), file=sys.stderr)
        return 1
    print(f"torch {args.torch} (CUDA {args.cuda}) and torchvision {args.torchvision}: as pinned")
    return 0


if __name__ == "__main__":
    sys.exit(main())
