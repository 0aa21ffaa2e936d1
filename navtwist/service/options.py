"""Command-line options shared by C{twistd navtwist} and the C{navtwist} command.

Both read the same config the same way, so the options that choose it are
defined once, in Twisted's C{usage.Options} style (twistd's own convention).
"""
from __future__ import annotations

import os
from importlib.metadata import PackageNotFoundError, version

from twisted.python import usage

from navtwist.config import Config, load_config, with_overrides


def navtwist_version() -> str:
    try:
        return version("navtwist")
    except PackageNotFoundError:  # run from a source tree that is not installed
        return "unknown"


class ConfigOptions(usage.Options):
    """C{--config} and C{--ca-dir}: which config, and where its CA lives."""

    optParameters = [
        ["config", "c", None, "YAML config file (default: the embedded default config)."],
        ["ca-dir", None, None, "Directory of ca.pem and ca.key, overriding the config."],
    ]
    compData = usage.Completions(
        optActions={"config": usage.CompleteFiles("*.yaml"), "ca-dir": usage.CompleteDirs()}
    )

    def opt_version(self) -> None:
        """Print navtwist's version and exit."""
        print(f"navtwist {navtwist_version()}")
        raise SystemExit(0)

    def read_config(self, listen: str | None = None, previous: Config | None = None,
                         require_keys: bool = False) -> Config:
        """The config these options name: the file (or the embedded default) plus the overrides."""
        loaded = load_config(self["config"], os.environ, require_keys=require_keys, previous=previous)
        return with_overrides(loaded, listen, self["ca-dir"])
