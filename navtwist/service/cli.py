"""The C{navtwist} command: helpers around the proxy, which itself runs as C{twistd navtwist}.

Each subcommand is a parser plus a function taking the parsed arguments and
returning the exit code; problems the user must fix are one line on stderr
and exit code 2, like usage errors.
"""
from __future__ import annotations

import argparse
import os
import sys

from navtwist.ca import CAError, CertificateAuthority, permitted_hosts
from navtwist.config import ConfigError, load_config, with_overrides
from navtwist.service.sandbox_env import FORMATS, EnvError, prepare, refresh_bundle, render

USER_ERROR = 2


def main(argv: list[str] | None = None) -> int:
    """Run the command line C{argv} (default: C{sys.argv[1:]}); returns the exit code."""
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help, or a usage error argparse has already printed
        return int(e.code or 0)
    return args.run(args)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="navtwist", description="Helpers for the navtwist egress proxy.")
    commands = parser.add_subparsers(metavar="COMMAND", required=True)
    _add_env(commands)
    _add_ca(commands)
    return parser


def _add_env(commands: argparse._SubParsersAction) -> None:
    env = commands.add_parser(
        "env",
        help="print the environment that points a sandbox's tools at navtwist",
        description="Print the proxy and CA variables for a sandbox, creating the CA if missing "
        "and writing <ca_dir>/bundle.pem (the system's CAs plus navtwist's).",
    )
    env.add_argument("-c", "--config", metavar="C", help="YAML config file (default: the embedded default config)")
    env.add_argument("--ca-dir", metavar="D", help="directory of ca.pem and ca.key, overriding the config")
    env.add_argument(
        "--proxy-url", metavar="URL",
        help="how the sandbox reaches the proxy (default: derived from the config's listen)",
    )
    env.add_argument("--format", choices=list(FORMATS), default="sh", help="output format (default: %(default)s)")
    env.set_defaults(run=_env)


def _env(args: argparse.Namespace) -> int:
    try:
        config = with_overrides(load_config(args.config, os.environ, require_keys=False), None, args.ca_dir)
        result = prepare(config, args.proxy_url)
    except (ConfigError, CAError, EnvError, OSError) as e:
        print(f"navtwist env: {e}", file=sys.stderr)
        return USER_ERROR
    for note in result.notes:
        # A comment, so stderr merged into the sh or dotenv output stays valid.
        print(f"# {note}", file=sys.stderr)
    sys.stdout.write(render(result.variables, args.format))
    return 0


def _add_ca(commands: argparse._SubParsersAction) -> None:
    ca = commands.add_parser("ca", help="manage navtwist's CA", description="Manage navtwist's CA.")
    actions = ca.add_subparsers(metavar="ACTION", required=True)
    rotate = actions.add_parser(
        "rotate",
        help="replace the CA by a new one constrained to the config's hosts",
        description="Replace ca.pem and ca.key in the CA directory by a new CA whose name constraints "
        "permit inference.local and the config's intercepted hosts, and rewrite <ca_dir>/bundle.pem. "
        "The old files are replaced only once the new ones are complete.",
    )
    rotate.add_argument("-c", "--config", metavar="C", help="YAML config file (default: the embedded default config)")
    rotate.add_argument("--ca-dir", metavar="D", help="directory of ca.pem and ca.key, overriding the config")
    rotate.set_defaults(run=_ca_rotate)


def _ca_rotate(args: argparse.Namespace) -> int:
    try:
        config = with_overrides(load_config(args.config, os.environ, require_keys=False), None, args.ca_dir)
        hosts = permitted_hosts(config)
        ca = CertificateAuthority.rotate(config.ca_dir, permitted=hosts)
        bundle, notes = refresh_bundle(ca)
    except (ConfigError, CAError, EnvError, OSError) as e:
        print(f"navtwist ca rotate: {e}", file=sys.stderr)
        return USER_ERROR
    for note in notes:
        print(f"navtwist ca rotate: {note}", file=sys.stderr)
    print(
        f"navtwist ca rotate: re-issued the CA in {config.ca_dir} for {', '.join(dict.fromkeys(hosts))} "
        f"and rewrote {bundle}; restart navtwist and the sandboxes so they pick up the new CA"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
