"""The C{navtwist} command: helpers around the proxy, which itself runs as C{twistd navtwist}.

Its options are Twisted C{usage.Options} sub-commands sharing the config
options of C{twistd navtwist} (L{navtwist.service.options}); problems the
user must fix are one line on stderr and exit code 2, like usage errors.
"""
from __future__ import annotations

import sys
from typing import Any

from twisted.python import usage

from navtwist.ca import CAError, CertificateAuthority, permitted_hosts
from navtwist.config import ConfigError
from navtwist.service.options import ConfigOptions
from navtwist.service.sandbox_env import FORMATS, EnvError, prepare, refresh_bundle, render

USER_ERROR = 2


def _format(value: str) -> str:
    if value not in FORMATS:
        raise ValueError(f"expected one of {', '.join(FORMATS)}")
    return value


class EnvOptions(ConfigOptions):
    """C{navtwist env}: print the environment that points a sandbox's tools at navtwist."""

    synopsis = "navtwist env [options]"
    longdesc = ("Print the proxy, CA and credential-placeholder variables for a sandbox, creating the CA "
                "if missing and writing <ca_dir>/bundle.pem (the system's CAs plus navtwist's).")
    optParameters: list[list[Any]] = [
        ["proxy-url", None, None, "How the sandbox reaches the proxy (default: derived from the config's listen)."],
        ["format", None, "sh", f"Output format: {', '.join(FORMATS)}.", _format],
    ]
    compData = usage.Completions(optActions={"format": usage.CompleteList(list(FORMATS))})

    def run(self) -> int:
        try:
            result = prepare(self.read_config(), self["proxy-url"])
        except (ConfigError, CAError, EnvError, OSError) as e:
            return _fail("navtwist env", e)
        for note in result.notes:
            # A comment, so stderr merged into the sh or dotenv output stays valid.
            print(f"# {note}", file=sys.stderr)
        sys.stdout.write(render(result.variables, self["format"]))
        return 0


class RotateOptions(ConfigOptions):
    """C{navtwist ca rotate}: replace the CA by a new one constrained to the config's hosts."""

    synopsis = "navtwist ca rotate [options]"
    longdesc = ("Replace ca.pem and ca.key in the CA directory by a new CA whose name constraints permit "
                "inference.local and the config's intercepted hosts (none with ca_name_constraints: false), "
                "and rewrite <ca_dir>/bundle.pem. The old files are replaced only once the new ones are complete.")

    def run(self) -> int:
        try:
            config = self.read_config()
            hosts = permitted_hosts(config)
            ca = CertificateAuthority.rotate(config.ca_dir, permitted=hosts if config.ca_name_constraints else None)
            bundle, notes = refresh_bundle(ca)
        except (ConfigError, CAError, EnvError, OSError) as e:
            return _fail("navtwist ca rotate", e)
        for note in notes:
            print(f"navtwist ca rotate: {note}", file=sys.stderr)
        print(
            f"navtwist ca rotate: re-issued the CA in {config.ca_dir} for {', '.join(dict.fromkeys(hosts))} "
            f"and rewrote {bundle}; restart navtwist and the sandboxes so they pick up the new CA"
        )
        return 0


class CAOptions(usage.Options):
    """C{navtwist ca ACTION}."""

    synopsis = "navtwist ca rotate [options]"
    subCommands = [["rotate", None, RotateOptions, "Replace the CA by a new one constrained to the config's hosts."]]

    def postOptions(self) -> None:
        if self.subCommand is None:
            raise usage.UsageError("choose an action: rotate")


class NavtwistOptions(usage.Options):
    """C{navtwist COMMAND}."""

    synopsis = "navtwist COMMAND [options]"
    longdesc = "Helpers for the navtwist egress proxy (the proxy itself runs as `twistd navtwist`)."
    subCommands = [
        ["env", None, EnvOptions, "Print the environment that points a sandbox's tools at navtwist."],
        ["ca", None, CAOptions, "Manage navtwist's CA."],
    ]
    opt_version = ConfigOptions.opt_version

    def postOptions(self) -> None:
        if self.subCommand is None:
            raise usage.UsageError("choose a command: env, ca")


def _fail(command: str, error: Exception) -> int:
    print(f"{command}: {error}", file=sys.stderr)
    return USER_ERROR


def main(argv: list[str] | None = None) -> int:
    """Run the command line C{argv} (default: C{sys.argv[1:]}); returns the exit code."""
    options = NavtwistOptions()
    try:
        options.parseOptions(sys.argv[1:] if argv is None else argv)
    except usage.UsageError as e:
        print(f"navtwist: {e} (see navtwist --help)", file=sys.stderr)
        return USER_ERROR
    except SystemExit as e:  # --help and --version print and exit
        return int(e.code or 0)
    command = options.subOptions
    if isinstance(command, CAOptions):
        command = command.subOptions
    return int(command.run())


if __name__ == "__main__":
    sys.exit(main())
