"""`navtwist env`: the variables that point a sandbox's tools at navtwist, and the CA bundle.

The integration test runs the openai SDK in a process whose environment is
exactly what `navtwist env` printed, so it proves that the printed variables
alone route the SDK through the proxy and make it trust navtwist's CA.
"""
from __future__ import annotations

import json
import os
import shlex
import ssl
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from navtwist.ca import CertificateAuthority
from navtwist.service.cli import main
from navtwist.config import load_config
from navtwist.service.sandbox_env import (
    BUNDLE_VARIABLES,
    COMMON_SYSTEM_STORES,
    PROXY_VARIABLES,
    EnvError,
    ProxyURL,
    check_proxy_url,
    prepare,
    proxy_url_from_listen,
    render,
    system_store_candidates,
)
from upstream import OPENAI_KEY, OPENAI_MODEL, Stream, openai_chat_events, routes_config, tokens

TIMEOUT = 10.0  # bounds every subprocess and client call here
MOCK_ROUTES = [{"name": "inference.local", "endpoint": "mock://", "model": "m", "protocols": ["openai_chat_completions"]}]
ALL_INTERFACES = "accepts connections on all interfaces"


def write_config(tmp_path: Path, **config: Any) -> Path:
    """A valid config file (mock route, CA in tmp_path/ca) with C{config} merged in."""
    path = tmp_path / "navtwist.yaml"
    path.write_text(yaml.safe_dump({"ca_dir": str(tmp_path / "ca"), "routes": MOCK_ROUTES, **config}))
    return path


def config_for(tmp_path: Path, **config: Any):
    return load_config(str(write_config(tmp_path, **config)), {})


def other_cas_pem(tmp_path: Path, count: int) -> bytes:
    """PEM of C{count} unrelated CAs, standing in for the system store."""
    return b"".join(CertificateAuthority.load_or_create(tmp_path / f"system{i}").certificate_pem()
                    for i in range(count))


# --- the proxy URL -----------------------------------------------------------------------


@pytest.mark.parametrize(("listen", "url", "wildcard"), [
    ("tcp:3128:interface=127.0.0.1", "http://127.0.0.1:3128", False),
    ("tcp:3128:10.1.2.3", "http://10.1.2.3:3128", False),  # tcp's 2nd positional is the interface
    ("tcp:port=8080:backlog=5:interface=127.0.0.2", "http://127.0.0.2:8080", False),
    ("tcp:3128", "http://127.0.0.1:3128", True),
    ("tcp:3128:interface=0.0.0.0", "http://127.0.0.1:3128", True),
    (r"tcp:3128:interface=\:\:", "http://[::1]:3128", True),
    (r"tcp:3128:interface=\:\:1", "http://[::1]:3128", False),
    ("tcp6:3128", "http://[::1]:3128", True),
    (r"tcp6:3128:interface=2001\:db8\:\:5", "http://[2001:db8::5]:3128", False),
    (r"tcp6:3128:50:fe80\:\:1%eth0", "http://[fe80::1%25eth0]:3128", False),  # tcp6: port, backlog, interface
])
def test_proxy_url_from_listen(listen, url, wildcard):
    derived = proxy_url_from_listen(listen)

    assert derived.url == url
    if wildcard:
        assert ALL_INTERFACES in derived.note and url in derived.note and "--proxy-url" in derived.note
    else:
        assert derived == ProxyURL(url, None)


@pytest.mark.parametrize("listen", [
    "unix:/run/navtwist.sock",
    "ssl:3128:privateKey=key.pem",
    "systemd:domain=INET:index=0",
    "tcp:0",
    "tcp:http",
    "tcp:65536",
    "tcp:interface=127.0.0.1",
    "tcp:3128:interface=localhost",
    "tcp",
    "",
])
def test_underivable_listen_asks_for_proxy_url(listen):
    with pytest.raises(EnvError) as caught:
        proxy_url_from_listen(listen)

    message = str(caught.value)
    assert "\n" not in message and message.endswith("pass --proxy-url")


@pytest.mark.parametrize("url", ["http://10.0.0.1:3128", "https://proxy.example:8443", "http://[fd00::1]:3128",
                                 "http://proxy"])
def test_usable_proxy_url_is_kept(url):
    assert check_proxy_url(url) == url


@pytest.mark.parametrize("url", ["socks5://u:hunter2@h:1080", "http://u:hunter2@h:99999", "http://u:hunter2@h:0",
                                 "http://", "hunter2", "http://h:1/ hunter2", "http://h:1/\nhunter2"])
def test_unusable_proxy_url_is_refused_without_echoing_it(url):
    with pytest.raises(EnvError) as caught:
        check_proxy_url(url)

    assert "hunter2" not in str(caught.value) and "\n" not in str(caught.value)


# --- output formats ----------------------------------------------------------------------

AWKWARD = {
    "PLAIN": "http://127.0.0.1:3128",
    "SPACE": "/tmp/my ca/bundle.pem",
    "QUOTES": """it's "quoted\"""",
    "SHELLY": "back\\slash $HOME `id` #hash; *",
    "NEWLINE": "two\nlines",
    "EMPTY": "",
}


def test_sh_format_survives_a_real_shell():
    """Sourced by /bin/sh, every value arrives exported and unchanged."""
    dump = f"exec {shlex.quote(sys.executable)} -c 'import json, os; print(json.dumps(dict(os.environ)))'"
    shell = subprocess.run(["/bin/sh", "-c", render(AWKWARD, "sh") + dump], env={}, capture_output=True,
                           timeout=TIMEOUT, check=True, text=True)

    assert {name: json.loads(shell.stdout)[name] for name in AWKWARD} == AWKWARD
    assert render(AWKWARD, "sh").splitlines()[0] == "export PLAIN=http://127.0.0.1:3128"


def test_dotenv_format_quotes_only_when_needed():
    assert render(AWKWARD, "dotenv") == (
        "PLAIN=http://127.0.0.1:3128\n"
        'SPACE="/tmp/my ca/bundle.pem"\n'
        'QUOTES="it\'s \\"quoted\\""\n'
        'SHELLY="back\\\\slash $HOME `id` #hash; *"\n'
        'NEWLINE="two\\nlines"\n'
        'EMPTY=""\n'
    )


def test_json_format_is_one_object_in_order():
    text = render(AWKWARD, "json")

    assert json.loads(text) == AWKWARD
    assert list(json.loads(text)) == list(AWKWARD)


# --- the CA bundle -----------------------------------------------------------------------


def test_variables_point_at_proxy_bundle_and_ca(tmp_path):
    system = tmp_path / "system.pem"
    system.write_bytes(other_cas_pem(tmp_path, 2))

    env = prepare(config_for(tmp_path), None, [str(system)])

    ca_dir = tmp_path / "ca"
    assert env.notes == []
    assert env.variables == {
        **dict.fromkeys(PROXY_VARIABLES, "http://127.0.0.1:3128"),
        "NO_PROXY": "localhost,127.0.0.1,::1",
        "no_proxy": "localhost,127.0.0.1,::1",
        **dict.fromkeys(BUNDLE_VARIABLES, str(ca_dir / "bundle.pem")),
        "NODE_EXTRA_CA_CERTS": str(ca_dir / "ca.pem"),
        # Node's built-in fetch ignores HTTPS_PROXY without it
        "NODE_USE_ENV_PROXY": "1",
    }
    assert list(env.variables) == [*PROXY_VARIABLES, "NO_PROXY", "no_proxy", *BUNDLE_VARIABLES, "NODE_EXTRA_CA_CERTS",
                                   "NODE_USE_ENV_PROXY"]


def test_bundle_holds_system_store_then_ca(tmp_path):
    system_pem = other_cas_pem(tmp_path, 2)
    system = tmp_path / "system.pem"
    system.write_bytes(system_pem.rstrip())  # no final newline: the CA must still start on its own line
    not_pem = tmp_path / "empty.pem"
    not_pem.touch()

    prepare(config_for(tmp_path), None, [str(tmp_path / "missing.pem"), str(not_pem), str(system)])

    ca_dir = tmp_path / "ca"
    bundle = ca_dir / "bundle.pem"
    assert bundle.read_bytes() == system_pem + (ca_dir / "ca.pem").read_bytes()
    assert ssl.create_default_context(cafile=str(bundle)).cert_store_stats()["x509_ca"] == 3
    assert stat.S_IMODE(bundle.stat().st_mode) == 0o644
    assert sorted(p.name for p in ca_dir.iterdir()) == ["bundle.pem", "ca.key", "ca.pem"]  # no temporary left


def test_without_system_store_bundle_is_the_ca_alone_with_a_warning(tmp_path):
    env = prepare(config_for(tmp_path, listen="tcp:3128:interface=127.0.0.1"), None, [str(tmp_path / "missing.pem")])

    ca_dir = tmp_path / "ca"
    assert (ca_dir / "bundle.pem").read_bytes() == (ca_dir / "ca.pem").read_bytes()
    [warning] = env.notes
    assert warning.startswith("warning: no system CA store found")


def test_unchanged_bundle_is_not_rewritten_even_when_it_is_the_reported_system_store(tmp_path):
    """With SSL_CERT_FILE pointing at the bundle, Python reports the bundle as
    the system store; it must be skipped, or it would grow on every run."""
    system = tmp_path / "system.pem"
    system.write_bytes(other_cas_pem(tmp_path, 1))
    config = config_for(tmp_path)
    bundle = tmp_path / "ca" / "bundle.pem"
    candidates = [str(bundle), str(system)]

    prepare(config, None, candidates)
    before = bundle.stat()
    prepare(config, None, candidates)
    after = bundle.stat()

    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    system.write_bytes(other_cas_pem(tmp_path, 2))
    prepare(config, None, candidates)
    assert bundle.stat().st_ino != before.st_ino
    assert bundle.read_bytes() == system.read_bytes() + (tmp_path / "ca" / "ca.pem").read_bytes()


def test_system_store_candidates_in_order(monkeypatch):
    paths = ssl.DefaultVerifyPaths("/py/cafile.pem", "/py/capath", "SSL_CERT_FILE", "/openssl/cert.pem",
                                   "SSL_CERT_DIR", "/openssl/certs")
    monkeypatch.setattr(ssl, "get_default_verify_paths", lambda: paths)
    certifi = pytest.importorskip("certifi")

    assert system_store_candidates() == ["/py/cafile.pem", "/openssl/cert.pem", certifi.where(), *COMMON_SYSTEM_STORES]

    monkeypatch.setitem(sys.modules, "certifi", None)  # not installed
    monkeypatch.setattr(ssl, "get_default_verify_paths", lambda: paths._replace(cafile=None))  # file absent
    assert system_store_candidates() == ["/openssl/cert.pem", *COMMON_SYSTEM_STORES]


# --- the command -------------------------------------------------------------------------


def test_command_prints_json_and_notes_the_wildcard_on_stderr(tmp_path, capsys):
    config = write_config(tmp_path, listen="tcp:3199")

    assert main(["env", "--config", str(config), "--format", "json"]) == 0

    out, err = capsys.readouterr()
    variables = json.loads(out)
    assert variables["HTTPS_PROXY"] == "http://127.0.0.1:3199"
    assert variables["SSL_CERT_FILE"] == str(tmp_path / "ca" / "bundle.pem")
    assert (tmp_path / "ca" / "bundle.pem").is_file()
    notes = err.splitlines()
    assert notes and all(line.startswith("# ") for line in notes)
    assert ALL_INTERFACES in notes[0]


def test_command_proxy_url_and_ca_dir_override_the_config(tmp_path, capsys, monkeypatch):
    """--proxy-url also makes a unix: listener usable; a relative --ca-dir is made absolute."""
    config = write_config(tmp_path, listen="unix:/run/navtwist.sock")
    monkeypatch.chdir(tmp_path)

    assert main(["env", "-c", str(config), "--ca-dir", "other", "--proxy-url", "http://10.0.0.1:3128"]) == 0

    lines = capsys.readouterr().out.splitlines()
    assert "export HTTPS_PROXY=http://10.0.0.1:3128" in lines
    assert f"export NODE_EXTRA_CA_CERTS={tmp_path / 'other' / 'ca.pem'}" in lines
    assert "export NODE_USE_ENV_PROXY=1" in lines  # Node's fetch ignores HTTPS_PROXY without it
    assert (tmp_path / "other" / "bundle.pem").is_file() and not (tmp_path / "ca").exists()


@pytest.mark.parametrize(("config", "extra", "expected"), [
    (None, [], "cannot read"),
    ({"routes": MOCK_ROUTES, "colour": "blue"}, [], "colour: unknown key"),
    ({"listen": "unix:/run/navtwist.sock"}, [], "pass --proxy-url"),
    ({}, ["--proxy-url", "ftp://proxy"], "--proxy-url must be"),
    ({}, ["--ca-dir", " "], "ca_dir: must not be empty"),
    ({"ca_dir": "half-ca"}, [], "ca.key is missing"),
], ids=["missing-config", "invalid-config", "unix-listen", "bad-proxy-url", "blank-ca-dir", "half-ca"])
def test_command_errors_are_one_line_and_exit_2(tmp_path, capsys, monkeypatch, config, extra, expected):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "navtwist.yaml"
    if config is not None:
        path.write_text(yaml.safe_dump({"ca_dir": "ca", "routes": MOCK_ROUTES, **config}))
    (tmp_path / "half-ca").mkdir()
    (tmp_path / "half-ca" / "ca.pem").write_text("only the certificate")

    assert main(["env", "--config", str(path), *extra]) == 2

    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith("navtwist env: ") and err.count("\n") == 1 and expected in err
    assert not (tmp_path / "ca").exists(), "the CA is created only once everything else is valid"


def test_command_usage(capsys):
    assert main([]) == 2
    assert main(["env", "--format", "xml"]) == 2
    assert "expected one of sh, json, dotenv" in capsys.readouterr().err
    assert main(["env", "--help"]) == 0
    assert "--proxy-url" in capsys.readouterr().out
    assert main(["--version"]) == 0 and capsys.readouterr().out.startswith("navtwist ")


# --- end to end --------------------------------------------------------------------------

SDK_SCRIPT = f"""
import openai
client = openai.OpenAI(base_url="https://inference.local/v1", api_key="x", max_retries=0, timeout={TIMEOUT})
stream = client.chat.completions.create(model="m", messages=[{{"role": "user", "content": "hi"}}], stream=True)
for chunk in stream:
    if chunk.choices and chunk.choices[0].delta.content:
        print(chunk.choices[0].delta.content, end="", flush=True)
"""


@pytest.mark.integration
@pytest.mark.parametrize("dropped", [(), ("SSL_CERT_FILE",), PROXY_VARIABLES],
                         ids=["printed-environment", "without-SSL_CERT_FILE", "without-proxy-variables"])
def test_openai_sdk_streams_through_proxy_with_only_the_printed_environment(start_proxy, upstream, dropped):
    """The SDK's HTTP client (httpx, trust_env) takes the proxy and the CA from
    the environment alone; the controls show each half is really needed."""
    proxy = start_proxy(routes_config(upstream.url))
    parts = tokens(5)
    upstream.script = Stream(events=openai_chat_events(parts))
    twistd_args = proxy.process.args
    config = twistd_args[twistd_args.index("--config") + 1]

    printed = subprocess.run([sys.executable, "-m", "navtwist.service.cli", "env", "--config", config, "--format", "json"],
                             capture_output=True, text=True, timeout=TIMEOUT, check=True)
    variables = json.loads(printed.stdout)
    assert variables["HTTPS_PROXY"] == proxy.url
    assert variables["NODE_EXTRA_CA_CERTS"] == str(proxy.ca_path)

    env = {name: value for name, value in variables.items() if name not in dropped}
    env |= {name: os.environ[name] for name in ("PATH", "HOME") if name in os.environ}
    sdk = subprocess.run([sys.executable, "-c", SDK_SCRIPT], env=env, capture_output=True, text=True,
                         timeout=2 * TIMEOUT)

    if dropped:
        assert sdk.returncode != 0 and "openai.APIConnectionError" in sdk.stderr
        if "SSL_CERT_FILE" in dropped:
            assert "CERTIFICATE_VERIFY_FAILED" in sdk.stderr
        assert upstream.exchanges == []
        return
    assert sdk.returncode == 0, sdk.stderr
    assert sdk.stdout == "".join(parts)
    exchange = upstream.only()
    assert (exchange.method, exchange.path) == ("POST", "/v1/chat/completions")
    assert exchange.headers["authorization"] == f"Bearer {OPENAI_KEY}"
    assert exchange.json()["model"] == OPENAI_MODEL
