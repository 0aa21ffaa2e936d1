"""The C{navtwist} command: helpers around the proxy, which itself runs as C{twistd navtwist}.

Each subcommand is a parser plus a function taking the parsed arguments and
returning the exit code; problems the user must fix are one line on stderr
and exit code 2, like usage errors.
"""
from __future__ import annotations

import argparse
import os
import sys

from navtwist.ca import CAError
from navtwist.config import ConfigError, load_config, with_overrides
from navtwist.service.sandbox_env import FORMATS, EnvError, prepare, render

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


if __name__ == "__main__":
    sys.exit(main())
