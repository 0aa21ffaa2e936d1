# The first two targets are the README's first two commands.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
ARGS ?=

.PHONY: run test test-agents check typecheck check-floor bench clean

run: $(VENV)/.installed
	$(BIN)/twistd -n --pidfile= navtwist $(ARGS)

test: $(VENV)/.installed-test
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# The fast deterministic tier: no sockets, no subprocesses, no SDKs needed; then mypy.
FAST := -m "not integration" -q
check: $(VENV)/.installed-test
	$(BIN)/python -m pytest $(FAST) $(PYTEST_ARGS)
	$(BIN)/python -m mypy navtwist

# Types are checked against the newest releases only: older Twisted, treq and
# pyOpenSSL annotate some of the same APIs differently.
typecheck: $(VENV)/.installed-test
	$(BIN)/python -m mypy navtwist

# The same tier on the lowest release of every dependency (constraints-floor.txt),
# in a venv of its own that has no client SDKs.
FLOOR_VENV ?= .venv-floor
check-floor: $(FLOOR_VENV)/.installed
	$(FLOOR_VENV)/bin/python -m pytest $(FAST) $(PYTEST_ARGS)

$(FLOOR_VENV)/.installed: pyproject.toml constraints-floor.txt
	$(PYTHON) -m venv $(FLOOR_VENV)
	$(FLOOR_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(PIP_QUIET) $(FLOOR_VENV)/bin/python -m pip install --quiet -c constraints-floor.txt -e '.[check]'
	$(FLOOR_VENV)/bin/python $(SOURCE_PTH)
	touch $@

# Editable installs put navtwist on sys.path through setuptools' finder, which
# Twisted's plugin discovery cannot see (it scans twisted/plugins/ directories on
# sys.path): a .pth file adds the checkout itself, so twistd finds the plugin here.
SOURCE_PTH = -c "import site, sys; print(sys.argv[1], file=open(site.getsitepackages()[0] + '/navtwist-source.pth', 'w'))" $(CURDIR)
# setuptools warns that the checkout's twisted/ folder could shadow Twisted when
# Python runs from the checkout: it cannot (twisted/ here is a namespace portion,
# Twisted a regular package, which always wins), so the install stays quiet.
PIP_QUIET = PYTHONWARNINGS=ignore

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.installed: pyproject.toml | $(VENV)/bin/python
	$(PIP_QUIET) $(BIN)/python -m pip install --quiet -e .
	$(BIN)/python $(SOURCE_PTH)
	touch $@

$(VENV)/.installed-test: pyproject.toml | $(VENV)/bin/python
	$(PIP_QUIET) $(BIN)/python -m pip install --quiet -e '.[test]'
	$(BIN)/python $(SOURCE_PTH)
	touch $(VENV)/.installed $@

# Real clients (Claude Code, the Codex CLI, the openai and Anthropic Node SDKs) through a real
# navtwist, installed from npm (tests/agents/package.json, versions pinned, package-lock.json)
# into $(AGENTS_CACHE). As root the session runs in a loopback-only network namespace.
AGENTS_CACHE ?= .agents-cache
NPM ?= npm
test-agents: $(VENV)/.installed-test $(AGENTS_CACHE)/.installed
	NAVTWIST_AGENTS_DIR=$(CURDIR)/$(AGENTS_CACHE) tests/agents/isolated $(BIN)/python -m pytest -m agents tests/agents -p no:cacheprovider $(PYTEST_ARGS)

$(AGENTS_CACHE)/.installed: tests/agents/package.json tests/agents/package-lock.json
	mkdir -p $(AGENTS_CACHE)
	cp tests/agents/package.json tests/agents/package-lock.json $(AGENTS_CACHE)/
	cd $(AGENTS_CACHE) && $(NPM) ci --no-audit --no-fund --loglevel=error
	touch $@

clean:
	rm -rf $(VENV) $(FLOOR_VENV) $(AGENTS_CACHE) build *.egg-info twisted/plugins/dropin.cache .mypy_cache

# --- benchmarks (bench/; not part of `make test`) ------------------------------------
# Two venvs: mitmproxy 11 pins pyOpenSSL<=24.3, while Twisted[tls] 26 needs pyOpenSSL>=25.3;
# one venv would run navtwist on an older Twisted than `make run` does.
BENCH_VENV ?= bench/.venv
BENCH_MITM_VENV ?= bench/.venv-mitm
MITMPROXY ?= mitmproxy==11.0.2
BENCH_ARGS ?=
SOAK_SECONDS ?= 600
# 1,000 streams need ~3,000 descriptors in the proxy: raise the soft limit as far as allowed.
BENCH_ULIMIT := ulimit -n 65536 2>/dev/null || ulimit -n $$(ulimit -Hn);

$(BENCH_VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(BENCH_VENV)
	$(BENCH_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(PIP_QUIET) $(BENCH_VENV)/bin/python -m pip install --quiet -e . matplotlib py-spy
	$(BENCH_VENV)/bin/python $(SOURCE_PTH)
	touch $@

$(BENCH_MITM_VENV)/.installed:
	$(PYTHON) -m venv $(BENCH_MITM_VENV)
	$(BENCH_MITM_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(BENCH_MITM_VENV)/bin/python -m pip install --quiet '$(MITMPROXY)'
	touch $@

bench: $(BENCH_VENV)/.installed $(BENCH_MITM_VENV)/.installed
	$(BENCH_ULIMIT) $(BENCH_VENV)/bin/python -m bench.runner $(BENCH_ARGS)

# Single scenarios, each writing its own marked section of docs/benchmarks.md.
.PHONY: bench-intercept bench-slow-readers bench-tls-abort
bench-intercept: $(BENCH_VENV)/.installed $(BENCH_MITM_VENV)/.installed
	$(BENCH_ULIMIT) $(BENCH_VENV)/bin/python -m bench.intercept $(BENCH_ARGS)

bench-slow-readers: $(BENCH_VENV)/.installed
	$(BENCH_ULIMIT) $(BENCH_VENV)/bin/python -m bench.slow_readers $(BENCH_ARGS)

bench-tls-abort: $(BENCH_VENV)/.installed
	$(BENCH_ULIMIT) $(BENCH_VENV)/bin/python -m bench.tls_abort $(BENCH_ARGS)

.PHONY: soak
soak: $(BENCH_VENV)/.installed
	$(BENCH_ULIMIT) SOAK_SECONDS=$(SOAK_SECONDS) $(BENCH_VENV)/bin/python -m bench.soak
