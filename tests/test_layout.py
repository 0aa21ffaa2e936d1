"""The package layout is the data path: these rules keep it so.

listener → http → egress | intercept → inference → upstream, with the
service shell on top and a few leaves (config, ca, interfaces, outcome)
that any stage may use.  A module may import its own stage, any later
stage and the leaves; never an earlier stage.  docs/architecture.md lists
exactly the modules that exist.
"""
from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "navtwist"

# Smaller runs earlier on the data path; the shell (service) is above all.
STAGES = {"service": 0, "listener": 1, "http": 2, "egress": 3, "intercept": 3, "inference": 4, "upstream": 5}
# Definitions every stage may read; they import no stage themselves.
LEAVES = {"config", "ca", "interfaces", "outcome", "compat", "decisions", "listen_address", "secret"}
# Extensions and test helpers sit outside the data path and may import anything.
OUTSIDE = {"plugins", "testing", "__init__"}
# config reads the vocabularies it validates against; each imports no stage module itself.
CONFIG_VOCABULARIES = {
    "navtwist.egress.policy",
    "navtwist.intercept.rules",
    "navtwist.intercept.credentials",
    "navtwist.inference.protocols",
    "navtwist.inference.providers",
    "navtwist.inference.hooks",
}


def _modules() -> dict[str, Path]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


def _imports(path: Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module.startswith("navtwist"):
                out.add(node.module)
                out.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names if alias.name.startswith("navtwist"))
    return out


MODULES = _modules()
GRAPH = {name: {i for i in _imports(path) if i in MODULES and i != name} for name, path in MODULES.items()}


def _stage(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


@pytest.mark.parametrize("module", sorted(MODULES))
def test_no_import_from_an_earlier_stage(module: str) -> None:
    here = _stage(module)
    for target in GRAPH[module]:
        there = _stage(target)
        if here in OUTSIDE or there == here:
            continue
        if module == "navtwist.config":
            assert there in LEAVES or target in CONFIG_VOCABULARIES or target in {
                f"navtwist.{s}" for s in STAGES}, f"config imports behaviour: {target}"
            continue
        if target == "navtwist.plugins":
            continue  # the package getPlugins searches; its modules are never imported
        assert there not in OUTSIDE - {"__init__"}, f"{module} imports {target} (plugins are discovered, not imported)"
        if here in LEAVES:
            assert there in LEAVES, f"leaf {module} imports {target}"
        elif there in STAGES:
            assert STAGES[there] >= STAGES[here], f"{module} ({here}) imports earlier stage {target} ({there})"


def test_config_vocabularies_import_no_stage() -> None:
    for vocabulary in CONFIG_VOCABULARIES & set(MODULES):
        for target in GRAPH[vocabulary]:
            assert _stage(target) in LEAVES or target in CONFIG_VOCABULARIES | {"navtwist.plugins", vocabulary.rsplit(".", 1)[0]}, (
                f"{vocabulary} imports {target}")


def test_no_import_cycles() -> None:
    seen: dict[str, int] = {}  # 1: on the stack, 2: done

    def visit(node: str, stack: list[str]) -> None:
        seen[node] = 1
        for nxt in sorted(GRAPH[node]):
            # A package's __init__ is imported with its modules; only module edges count.
            if nxt == node.rsplit(".", 1)[0]:
                continue
            if seen.get(nxt) == 1:
                raise AssertionError("import cycle: " + " → ".join(stack[stack.index(nxt):] + [nxt]))
            if nxt not in seen:
                visit(nxt, stack + [nxt])
        seen[node] = 2

    for module in sorted(MODULES):
        if module not in seen:
            visit(module, [module])


def test_architecture_doc_lists_exactly_the_modules() -> None:
    doc = (ROOT / "docs" / "architecture.md").read_text()
    table = doc.split("## Modules", 1)[1].split("\n## ", 1)[0]
    listed = set(re.findall(r"`(navtwist/[\w/]+\.py)`", table))
    files = {str(p.relative_to(ROOT)) for p in PACKAGE.rglob("*.py")}
    assert listed == files, f"missing from the doc: {sorted(files - listed)}; not in the tree: {sorted(listed - files)}"


def test_every_package_is_installed() -> None:
    """A package missing from pyproject's list imports from a checkout but not from an install."""
    import tomllib

    declared = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    packages = {".".join(p.parent.relative_to(ROOT).parts) for p in PACKAGE.rglob("__init__.py")}
    assert packages <= declared, f"not installed: {sorted(packages - declared)}"
