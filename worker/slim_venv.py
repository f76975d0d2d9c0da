"""Remove from the worker image's venv what no process of the image loads.

Run by worker/Dockerfile's build stage with the venv's own Python, after the hash-checked
install: ``python slim_venv.py /opt/s3rollup``. Removes

- pip (nothing installs into the image once built; the wheels are pinned and checked);
- the packages' test suites (``tests``/``test`` directories, pyarrow's C++ test module);
- C, C++ and Cython sources and headers (``include``/``src`` directories, ``*.h``,
  ``*.pyx``, ``*.pxd``, ...): inputs of builds against numpy or pyarrow, none happens here;
- pyarrow's Arrow Flight RPC (``pyarrow.flight``) and its S3 filesystem
  (``pyarrow.fs.S3FileSystem``): the job, the Dask scheduler and workers talk to S3 with
  boto3 and never load them. Without them ``import pyarrow.flight`` fails and pyarrow.fs
  says "not built with support for 'S3FileSystem'": an error, never a silent difference;
- the extra copies of a shared library that a wheel carries under several names (the
  ``libX.so``, ``libX.so.N``, ``libX.so.N.M`` of one library are three files in a wheel):
  one file, the others symbolic links to it.

Prints what it removed and the bytes saved. Fails if the venv has no site-packages, or if
a path it is told to remove by exact name is missing (a new wheel layout is then noticed
when the image is built, not by a job).
"""

from __future__ import annotations

import hashlib
import shutil
import sys
from collections import defaultdict
from pathlib import Path

TREES = {"tests", "test", "include", "src"}
SUFFIXES = {".h", ".hpp", ".hh", ".c", ".cc", ".cpp", ".pyx", ".pxd", ".pxi"}
# pyarrow modules and libraries: the Python extension, its helper library, Arrow's library.
PYARROW = [
    "_flight.*.so",
    "libarrow_python_flight.so*",
    "libarrow_flight.so*",
    "_s3fs.*.so",
    "libarrow_s3.so*",
    "_pyarrow_cpp_tests.*.so",
]
# Packages whose trees hold none of the above at run time (a package's own "src" or "test"
# module would be kept: only these are searched).
PACKAGES = ["pandas", "numpy", "pyarrow", "dask", "distributed", "tornado", "toolz", "zict", "fsspec"]


def size(path: Path) -> int:
    """Bytes under path (a symbolic link counts as nothing)."""
    if path.is_symlink() or path.is_file():
        return 0 if path.is_symlink() else path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def remove(path: Path, saved: dict[str, int], what: str) -> None:
    """Remove a file or a tree, counting its bytes under what."""
    saved[what] += size(path)
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()


def site_packages(venv: Path) -> Path:
    """The venv's one site-packages directory."""
    found = sorted(venv.glob("lib/python3*/site-packages"))
    if len(found) != 1:
        sys.exit(f"slim_venv: expected one site-packages under {venv}, found {found}")
    return found[0]


def deduplicate(directory: Path, saved: dict[str, int]) -> None:
    """Replace identical copies of a shared library (libX.so, libX.so.N, ...) with links to
    the copy named by the longest version (the real file a package manager would keep)."""
    groups: dict[str, list[Path]] = defaultdict(list)
    for path in directory.glob("lib*.so*"):
        if path.is_file() and not path.is_symlink():
            groups[path.name.split(".so")[0]].append(path)
    for copies in groups.values():
        by_digest: dict[str, list[Path]] = defaultdict(list)
        for path in copies:
            by_digest[hashlib.sha256(path.read_bytes()).hexdigest()].append(path)
        for same in by_digest.values():
            keep = max(same, key=lambda p: len(p.name))
            for path in same:
                if path != keep:
                    remove(path, saved, "duplicate shared libraries")
                    path.symlink_to(keep.name)


def slim(venv: Path) -> dict[str, int]:
    """Slim the venv at venv; the bytes saved by kind."""
    site = site_packages(venv)
    saved: dict[str, int] = defaultdict(int)
    pips = [*site.glob("pip"), *site.glob("pip-*.dist-info"), *(venv / "bin").glob("pip*")]
    if not pips:
        sys.exit(f"slim_venv: no pip in {venv}")
    for path in pips:
        remove(path, saved, "pip")
    for name in PACKAGES:
        package = site / name
        if not package.is_dir():
            sys.exit(f"slim_venv: {name} is not installed in {site}")
        for path in sorted(package.rglob("*"), reverse=True):  # children before parents
            if not path.exists() and not path.is_symlink():
                continue  # inside a tree removed already
            if path.is_dir() and path.name in TREES:
                remove(path, saved, "test suites" if path.name.startswith("test") else "sources, headers")
            elif path.is_file() and path.suffix in SUFFIXES:
                remove(path, saved, "sources, headers")
    pyarrow = site / "pyarrow"
    for pattern in PYARROW:
        matches = list(pyarrow.glob(pattern))
        if not matches:
            sys.exit(f"slim_venv: nothing matches pyarrow/{pattern}: has the wheel's layout changed?")
        for path in matches:
            remove(path, saved, "pyarrow Flight, S3 filesystem, C++ tests")
    for directory in {p.parent for p in site.rglob("lib*.so*")}:
        deduplicate(directory, saved)
    return saved


def main() -> None:
    """``python slim_venv.py VENV``."""
    if len(sys.argv) != 2:
        sys.exit("usage: slim_venv.py VENV")
    saved = slim(Path(sys.argv[1]))
    for what, n in sorted(saved.items(), key=lambda kv: -kv[1]):
        print(f"slim_venv: {what}: {n / 1e6:.1f} MB removed")
    print(f"slim_venv: {sum(saved.values()) / 1e6:.1f} MB removed in all")


if __name__ == "__main__":
    main()
