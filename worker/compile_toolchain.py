"""What ``torch.compile`` needs of the machine, checked at start-up instead of failing every image later.

On a GPU, inductor's Triton kernels need Triton's launcher, which Triton builds with a C compiler against
the Python headers on first use; on the CPU, inductor compiles C++ with a C++ compiler, against the same
headers. The shipped image's runtime stage has neither, so ``SAM3_BATCH_COMPILE=true`` is refused there
with one line (README: "Running on GPUs").
"""

from __future__ import annotations

import os
import shutil
import sysconfig
from collections.abc import Callable, Mapping
from pathlib import Path

from sam3_batch.contracts.errors import Sam3BatchError

# Triton reads CC, else looks for gcc or clang; inductor's C++ reads CXX, else uses g++.
_C_COMPILERS = ("cc", "gcc", "clang")
_CXX_COMPILERS = ("g++", "c++", "clang++")


class CompileUnavailableError(Sam3BatchError):
    """``compile`` was asked for on a machine without what torch.compile needs."""


def missing_for_compile(
    device_type: str,
    *,
    which: Callable[[str], str | None] = shutil.which,
    environ: Mapping[str, str] = os.environ,
    python_include: str | None = None,
) -> list[str]:
    """What this machine lacks for torch.compile on ``device_type`` (cuda or cpu); empty when nothing."""
    variable, names, kind = ("CXX", _CXX_COMPILERS, "a C++ compiler") if device_type == "cpu" else (
        "CC", _C_COMPILERS, "a C compiler")
    missing = []
    chosen = environ.get(variable)
    found = which(chosen) if chosen else next((path for name in names if (path := which(name))), None)
    if not found:
        missing.append(f"{kind} ({variable} or one of {', '.join(names)} on PATH)")
    include = Path(python_include or sysconfig.get_paths()["include"])
    if not (include / "Python.h").is_file():
        missing.append(f"the Python headers ({include}/Python.h)")
    return missing


def require_compile_toolchain(device_type: str) -> None:
    """Raise CompileUnavailableError (one readable line) when torch.compile could not build its kernels."""
    missing = missing_for_compile(device_type)
    if missing:
        raise CompileUnavailableError(
            f"SAM3_BATCH_COMPILE=true needs {' and '.join(missing)}, which this machine lacks: "
            "install them (build-essential and python3-dev) or set SAM3_BATCH_COMPILE=false"
        )
