#!/usr/bin/env python3
"""Pack this Python, with FluxShard and what the served models import, for Triton's python
backend (`EXECUTION_ENV_PATH`; docs/deploy.md, route (b)). No conda needed.

The python backend takes a `.tar.gz` in conda-pack's layout (or that layout unpacked): it
unpacks it into /tmp/python_env_*, then starts the model's stub as
`source <env>/bin/activate && exec env LD_LIBRARY_PATH=<env>/lib:$LD_LIBRARY_PATH <stub> ...`.
The stub embeds libpython and runs it isolated (no PYTHONPATH, no PYTHONHOME): it takes its
prefix from the first `python3` on PATH. So the environment is a complete Python prefix:

    bin/python3.X, bin/python3, bin/python   this interpreter (PATH lookup: the prefix)
    bin/activate                             puts bin/ first on PATH (sourced by bash)
    lib/libpython3.X.so.1.0                  the library the stub loads
    lib/python3.X/                           the standard library (with lib-dynload)
    lib/python3.X/site-packages/             FluxShard (from this checkout) and the installed
                                             distributions in SERVING_DISTRIBUTIONS with
                                             everything they require, copied file by file
                                             from their installed RECORDs

venv-pack cannot do this (a venv holds no interpreter, standard library or libpython: it needs
its base Python at the same path wherever it is unpacked), conda-pack needs a conda environment.
The Python's minor version must be the stub's (`--stub` checks it), and the target must have the
same CPU architecture and a glibc at least as new as this machine's.

    python3 scripts/pack_env.py --out fluxshard_env.tar.gz
    python3 scripts/pack_env.py --out /opt/fluxshard_env --folder     # unpacked: loads faster
"""

from __future__ import annotations

import argparse
import importlib.metadata as metadata
import os
import re
import shutil
import sys
import sysconfig
import tarfile
import tempfile
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parents[1]
# FluxShard's packages, copied from this checkout (an editable install has no files to copy)
SOURCE_PACKAGES = ("fluxshard", "fluxshard_client", "edge_runtime")
# what the served models import (the model files, fluxshard.sessions and the executors behind
# them); their own requirements are added. scipy: fluxshard.tiles imports it.
SERVING_DISTRIBUTIONS = ("torch", "numpy", "av", "onnx", "onnxruntime", "opencv-python-headless",
                         "xxhash", "scipy", "tqdm", "numba")
# not needed to run anything, and large: headers, CMake files, caches (folders); bytecode and
# static libraries (suffixes)
EXCLUDED_FOLDERS = ("__pycache__", "include", "cmake")
EXCLUDED_SUFFIXES = (".pyc", ".a")
ACTIVATE = """\
# FluxShard packed Python environment (conda-pack layout), sourced by Triton's python backend
# before it starts the stub: this prefix's python3 first on PATH is how the stub finds it.
_fluxshard_env_bin="$(cd "$(dirname "${BASH_SOURCE[0]:-$0}")" && pwd)"
export PATH="$_fluxshard_env_bin:$PATH"
export PYTHONNOUSERSITE=1
unset PYTHONHOME _fluxshard_env_bin
"""


class PackError(RuntimeError):
    pass


def python_tag() -> str:
    return f"{sys.version_info.major}.{sys.version_info.minor}"


def check_stub(stub: Path) -> None:
    """The stub links one libpython; this Python must be that version."""
    found = set(re.findall(rb"libpython(3\.\d+)\.so", Path(stub).read_bytes()))
    versions = sorted(v.decode() for v in found)
    if versions != [python_tag()]:
        raise PackError(f"the stub {stub} embeds Python {', '.join(versions) or '(none found)'}; "
                        f"this is Python {python_tag()}: pack with that Python")


def libpython() -> Path:
    """This interpreter's shared libpython (the stub loads it from <env>/lib)."""
    name = sysconfig.get_config_var("INSTSONAME") or f"libpython{python_tag()}.so.1.0"
    folders = [sysconfig.get_config_var(k) for k in ("LIBDIR", "LIBPL")]
    multiarch = sysconfig.get_config_var("MULTIARCH")
    if multiarch:
        folders.append(f"/usr/lib/{multiarch}")
    for folder in filter(None, folders):
        if (Path(folder) / name).is_file():
            return Path(folder) / name
    raise PackError(f"no {name} next to this Python ({', '.join(filter(None, folders))}): the "
                    "python backend's stub needs a shared libpython (a Python built with "
                    "--enable-shared, or the distribution's libpython3.X package)")


def requirement_closure(names) -> list[metadata.Distribution]:
    """The installed distributions ``names`` and, transitively, what they require (markers
    evaluated for this Python; extras not followed)."""
    seen: dict[str, metadata.Distribution] = {}
    pending = list(names)
    while pending:
        name = canonicalize_name(pending.pop())
        if name in seen:
            continue
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            raise PackError(f"{name} is required but not installed in this Python") from None
        seen[name] = dist
        for text in dist.requires or ():
            requirement = Requirement(text)
            if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
                pending.append(requirement.name)
    return sorted(seen.values(), key=lambda d: canonicalize_name(d.metadata["Name"]))


def _excluded(relative: Path) -> bool:
    return (relative.suffix in EXCLUDED_SUFFIXES
            or any(part in EXCLUDED_FOLDERS for part in relative.parts[:-1]))


def copy_distribution(dist: metadata.Distribution, site: Path) -> int:
    """Copy the distribution's installed files that live in its site-packages folder (console
    scripts elsewhere carry this machine's paths: left out); returns the bytes copied."""
    base = Path(dist.locate_file("")).resolve()
    copied = 0
    for entry in dist.files or ():
        source = Path(dist.locate_file(entry))
        try:
            relative = source.resolve().relative_to(base)
        except ValueError:
            continue
        if _excluded(relative) or not source.is_file():
            continue
        target = site / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, target)
        copied += target.stat().st_size
    return copied


def build_prefix(prefix: Path, distributions) -> dict:
    """The environment, unpacked, in ``prefix`` (an empty or absent folder)."""
    tag = python_tag()
    lib = prefix / "lib"
    for folder in (prefix / "bin", lib):
        folder.mkdir(parents=True, exist_ok=True)
    stdlib_target = lib / f"python{tag}"
    site = stdlib_target / "site-packages"
    interpreter = Path(sys.executable).resolve()
    shutil.copy2(interpreter, prefix / "bin" / f"python{tag}")
    for alias in ("python3", "python"):
        (prefix / "bin" / alias).symlink_to(f"python{tag}")
    (prefix / "bin" / "activate").write_text(ACTIVATE)
    shutil.copy2(libpython(), lib / libpython().name)
    stdlib = Path(sysconfig.get_path("stdlib"))
    shutil.copytree(stdlib, stdlib_target, symlinks=True, ignore=shutil.ignore_patterns(
        "site-packages", "dist-packages", "test", "idlelib", "tkinter", "turtledemo",
        "ensurepip", "__pycache__", "config-*"))
    dynload = Path(sysconfig.get_path("platstdlib")) / "lib-dynload"
    if dynload.is_dir() and not (stdlib_target / "lib-dynload").is_dir():
        shutil.copytree(dynload, stdlib_target / "lib-dynload")
    site.mkdir(parents=True, exist_ok=True)
    sizes = {}
    for dist in requirement_closure(distributions):
        name = canonicalize_name(dist.metadata["Name"])
        if name == "fluxshard":
            continue  # from the checkout, below
        sizes[f"{name}=={dist.version}"] = copy_distribution(dist, site)
    for package in SOURCE_PACKAGES:
        shutil.copytree(REPO / package, site / package,
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return sizes


def pack(out: Path, distributions=SERVING_DISTRIBUTIONS, folder: bool = False,
         compress_level: int = 1) -> dict:
    """Write the environment to ``out`` (a .tar.gz, or with ``folder`` the unpacked prefix);
    returns the distributions packed and their sizes."""
    out = Path(out)
    if folder:
        if out.exists() and any(out.iterdir()):
            raise PackError(f"{out} exists and is not empty")
        return build_prefix(out, distributions)
    if not out.name.endswith((".tar.gz", ".tgz")):
        raise PackError(f"--out must end in .tar.gz (the python backend's format), got {out}")
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="fluxshard-env-", dir=out.parent) as staging:
        prefix = Path(staging) / "env"
        sizes = build_prefix(prefix, distributions)
        partial = out.with_name(out.name + ".partial")
        # members at the archive's root, as conda-pack writes them
        with tarfile.open(partial, "w:gz", compresslevel=compress_level) as archive:
            for entry in sorted(prefix.iterdir()):
                archive.add(entry, arcname=entry.name)
        os.replace(partial, out)
    return sizes


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="\n".join(__doc__.splitlines()[2:]))
    ap.add_argument("--out", type=Path, required=True,
                    help="the .tar.gz to write (or, with --folder, the folder)")
    ap.add_argument("--folder", action="store_true",
                    help="write the unpacked environment (EXECUTION_ENV_PATH may name a folder)")
    ap.add_argument("--stub", type=Path, default=None,
                    help="the server's triton_python_backend_stub: check it embeds this Python")
    ap.add_argument("--extra", nargs="*", default=[], metavar="DIST",
                    help="more installed distributions to pack (with their requirements)")
    ap.add_argument("--compress-level", type=int, choices=range(1, 10), default=1,
                    help="gzip level (default 1: the archive is mostly compiled libraries)")
    args = ap.parse_args(argv)
    try:
        if args.stub is not None:
            check_stub(args.stub)
        sizes = pack(args.out, SERVING_DISTRIBUTIONS + tuple(args.extra), args.folder,
                     args.compress_level)
    except (PackError, OSError) as e:
        print(f"pack_env: {e}", file=sys.stderr)
        return 1
    size = "" if args.folder else f" ({args.out.stat().st_size / 1e6:.0f} MB)"
    print(f"Python {python_tag()} ({sys.executable}) with {len(sizes)} distributions and "
          f"{', '.join(SOURCE_PACKAGES)}: {args.out}{size}")
    for name, size in sorted(sizes.items(), key=lambda kv: -kv[1])[:8]:
        print(f"  {name}: {size / 1e6:.0f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
