"""The wall around private Twisted names: each hook is checked at import, and
nothing outside navtwist/compat.py uses a private Twisted name."""
from __future__ import annotations

import ast
import importlib
import inspect
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from twisted.web import client, http

from navtwist import compat

ROOT = Path(__file__).resolve().parent.parent

# (owner, name) of every private hook; removing any one must stop navtwist.
MODULE_HOOKS = [(http, "_ChunkedTransferDecoder"), (http, "_MalformedChunkedDataError"), (client, "_HTTP11ClientFactory")]
HOOKS = [
    (client.HTTPConnectionPool, "_factory"),
    (client.HTTPConnectionPool, "_putConnection"),
    (http.HTTPChannel, "_respondToBadRequestAndDisconnect"),
    (http.HTTPChannel, "_send100Continue"),
    (http.HTTPChannel, "_abortingCall"),
    (http._ChunkedTransferDecoder, "_dataReceived_CHUNK_LENGTH"),
    (http._ChunkedTransferDecoder, "_dataReceived_TRAILER"),
]


def test_installed_twisted_has_every_hook() -> None:
    assert compat.problems() == []


@pytest.mark.parametrize("owner, name", HOOKS, ids=[name for _, name in HOOKS])
def test_a_missing_hook_refuses_with_its_name_and_the_supported_range(
        monkeypatch: pytest.MonkeyPatch, owner: Any, name: str) -> None:
    monkeypatch.delattr(owner, name)
    with pytest.raises(compat.TwistedIncompatible) as raised:
        compat.check()
    message = str(raised.value)
    assert name in message and compat.SUPPORTED_TWISTED in message and "\n" not in message


@pytest.mark.parametrize("module, name", MODULE_HOOKS, ids=[name for _, name in MODULE_HOOKS])
def test_a_missing_private_class_refuses(module: ModuleType, name: str) -> None:
    # Twisted's modules are deprecation proxies that refuse delattr: check a copy without the name.
    without = ModuleType(module.__name__)
    read = ("HTTPChannel", "HTTPConnectionPool", *(hook for _, hook in MODULE_HOOKS))
    without.__dict__.update({k: getattr(module, k) for k in read if k != name and hasattr(module, k)})
    modules = {"web_http": http, "web_client": client}
    modules["web_http" if module is http else "web_client"] = without
    with pytest.raises(compat.TwistedIncompatible, match=f"{re.escape(module.__name__)}.{name} is missing"):
        compat.check(**modules)


def _renaming(monkeypatch: pytest.MonkeyPatch, method: str, old: str, new: str) -> None:
    """Make C{HTTPChannel.method} keep C{old} under C{new}, as a refactored Twisted might."""
    original = getattr(http.HTTPChannel, method)

    def renamed(self: Any, *args: Any) -> Any:
        result = original(self, *args)
        if old in vars(self):
            setattr(self, new, vars(self).pop(old))
        return result

    monkeypatch.setattr(http.HTTPChannel, method, renamed)


@pytest.mark.parametrize("method, attribute", [
    ("lineReceived", "_version"),
    ("lineReceived", "_receivedHeaderSize"),
    ("headerReceived", "_receivedHeaderCount"),
    ("headerReceived", "_transferDecoder"),
])
def test_an_instance_attribute_twisted_stops_setting_refuses(
        monkeypatch: pytest.MonkeyPatch, method: str, attribute: str) -> None:
    _renaming(monkeypatch, method, attribute, attribute + "_v2")
    with pytest.raises(compat.TwistedIncompatible, match=re.escape(attribute)):
        compat.check()


def test_a_decoder_attribute_twisted_stops_setting_refuses(monkeypatch: pytest.MonkeyPatch) -> None:
    original = http._ChunkedTransferDecoder.__init__

    def init(self: Any, *args: Any) -> None:
        original(self, *args)
        self._trailers = self.__dict__.pop("_trailerHeaders")

    monkeypatch.setattr(http._ChunkedTransferDecoder, "__init__", init)
    with pytest.raises(compat.TwistedIncompatible, match="_trailerHeaders"):
        compat.check()


def test_a_hook_with_another_signature_refuses(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(http.HTTPChannel, "_send100Continue", lambda self, request: None)
    with pytest.raises(compat.TwistedIncompatible, match=r"_send100Continue takes \('request',\), not \(\)"):
        compat.check()


def test_importing_navtwist_on_a_twisted_without_a_hook_fails_loudly() -> None:
    script = ("from twisted.web import http\n"
              "del http.HTTPChannel._respondToBadRequestAndDisconnect\n"
              "import navtwist.http.channel\n")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("navtwist.compat.TwistedIncompatible: navtwist cannot run on Twisted ")
    assert "_respondToBadRequestAndDisconnect is missing" in last and compat.SUPPORTED_TWISTED in last


def test_supported_range_is_the_declared_requirement() -> None:
    pyproject = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    assert f'"twisted[tls]{compat.SUPPORTED_TWISTED}"' in pyproject


def test_floor_constraints_pin_the_declared_floors() -> None:
    """constraints-floor.txt (CI's floor run) pins exactly the lower bounds pyproject declares."""
    pyproject = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    dependencies = re.search(r"^dependencies = \[(.*?)^\]", pyproject, re.M | re.S)
    assert dependencies is not None
    floors = {name.lower(): version for name, version in
              re.findall(r'"([A-Za-z0-9_.-]+)(?:\[[a-z]+\])?>=([0-9.]+)', dependencies.group(1))}
    pins = {}
    for line in (ROOT / "constraints-floor.txt").read_text(encoding="utf-8").splitlines():
        if line.strip() and not line.startswith("#"):
            name, version = line.split("==")
            pins[name.strip().lower()] = version.strip()
    assert pins == floors


def _source(cls: type) -> str:
    """A class's source; a generated one (proxyForInterface's) has none and adds no names."""
    try:
        return inspect.getsource(cls)
    except (OSError, TypeError):
        return ""


def _twisted_private_names_used(path: Path) -> list[str]:
    """Private Twisted names C{path} imports, or reaches on a Twisted class it subclasses."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("twisted"):
            found += [f"{node.module}.{a.name}" for a in node.names if a.name.startswith("_")]
            if any(part.startswith("_") for part in (node.module or "").split(".")):
                found.append(node.module or "")
    parts = path.relative_to(ROOT).with_suffix("").parts
    module = importlib.import_module(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    for node in ast.walk(tree):
        if not isinstance(node, ast.ClassDef) or not isinstance(getattr(module, node.name, None), type):
            continue
        bases = [c for c in getattr(module, node.name).__mro__ if c.__module__.startswith("twisted.")]
        if not bases:
            continue
        twisted_source = "\n".join(_source(c) for c in bases)
        names = {n.attr for n in ast.walk(node) if isinstance(n, ast.Attribute) and n.attr.startswith("_")}
        names |= {n.name for n in node.body if isinstance(n, ast.FunctionDef) and n.name.startswith("_")}
        found += [f"{node.name}.{name}" for name in sorted(names) if not name.startswith("__")
                  and re.search(rf"\b{re.escape(name)}\b", twisted_source)]
    return found


def test_no_module_but_compat_uses_a_private_twisted_name() -> None:
    used = {str(path.relative_to(ROOT)): names for path in sorted((ROOT / "navtwist").rglob("*.py"))
            if path.name != "compat.py" and (names := _twisted_private_names_used(path))}
    assert used == {}
