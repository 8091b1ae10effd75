"""The wheel installs one import package, ``sam3_batch``, with the repository's worker/ and producer/ inside.

The repository keeps worker/ and producer/ at the top (the design card's layout) and links them into the
package (sam3_batch/worker -> ../worker); the wheel must carry them as real files under sam3_batch/.
"""

from __future__ import annotations

import shutil
import stat
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LINKED_SUBPACKAGES = ("worker", "producer")
SOURCES = ("pyproject.toml", "README.md", "sam3_batch", *LINKED_SUBPACKAGES)


def build_wheel(workdir: Path) -> Path:
    """``pip wheel`` from a copy of the sources (links kept as links), so the checkout stays clean."""
    source = workdir / "src"
    source.mkdir()
    for name in SOURCES:
        path = REPO / name
        if path.is_dir():
            shutil.copytree(path, source / name, symlinks=True, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(path, source / name)
    assert (source / "sam3_batch" / "worker").is_symlink()  # the layout this test is about
    dist = workdir / "dist"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation", str(source),
         "--wheel-dir", str(dist)],
        check=True, capture_output=True, text=True, timeout=300, cwd=workdir,
    )
    (wheel,) = dist.glob("sam3_batch-*.whl")
    return wheel


def install_into_fresh_venv(wheel: Path, workdir: Path) -> Path:
    """A new venv (no system site-packages) with only the wheel installed; returns its site-packages."""
    env_dir = workdir / "venv"
    venv.create(env_dir, with_pip=False, system_site_packages=False)
    python = env_dir / "bin" / "python"
    subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "--quiet", "--no-deps",
         "--no-index", str(wheel)],
        check=True, capture_output=True, text=True, timeout=300,
    )
    (site_packages,) = env_dir.glob("lib/python*/site-packages")
    return site_packages


def top_level_names(site_packages: Path) -> set[str]:
    """Importable top-level names in a site-packages folder (metadata and caches left out)."""
    return {
        path.name.removesuffix(".py")
        for path in site_packages.iterdir()
        if not path.name.endswith((".dist-info", ".pth")) and path.name != "__pycache__"
    }


def test_wheel_installs_exactly_one_top_level_import_package_with_real_subpackages(tmp_path: Path) -> None:
    wheel = build_wheel(tmp_path)
    with zipfile.ZipFile(wheel) as archive:
        entries = archive.infolist()
        top_level_txt = next(e for e in entries if e.filename.endswith(".dist-info/top_level.txt"))
        assert archive.read(top_level_txt).decode().split() == ["sam3_batch"]
    assert {e.filename.split("/")[0] for e in entries if ".dist-info/" not in e.filename} == {"sam3_batch"}
    for name in LINKED_SUBPACKAGES:
        files = [e for e in entries if e.filename.startswith(f"sam3_batch/{name}/")]
        assert any(e.filename == f"sam3_batch/{name}/__init__.py" for e in files)
        assert {Path(e.filename).name for e in files} >= {p.name for p in (REPO / name).glob("*.py")}
        assert not any(stat.S_ISLNK(e.external_attr >> 16) for e in files), f"{name}: a link in the wheel"

    site_packages = install_into_fresh_venv(wheel, tmp_path)
    assert top_level_names(site_packages) == {"sam3_batch"}
    for name in (*LINKED_SUBPACKAGES, "contracts"):
        installed = site_packages / "sam3_batch" / name
        assert installed.is_dir() and not installed.is_symlink(), installed
        assert (installed / "__init__.py").is_file()

    # The installed packages import from the venv (their __init__ modules need no dependency).
    python = tmp_path / "venv" / "bin" / "python"
    probe = "import sam3_batch.worker as w, sam3_batch.producer as p; print(w.__file__); print(p.__file__)"
    done = subprocess.run([str(python), "-I", "-c", probe], capture_output=True, text=True, check=True, timeout=60)
    assert all(Path(line).is_relative_to(site_packages) for line in done.stdout.split())
