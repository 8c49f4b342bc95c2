# ksmpolicy: `make demo` runs the main job, `make test` runs every check. Both install what
# they need (scripts/bootstrap) on a fresh Debian 12 machine, as root.
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: all test test-fast lint docs-check typecheck pytest deb demo bench bench-policy bench-discovery bench-libvirt bench-status bench-pagemap bench-estimate bench-zero-pages bench-procevents bench-ksm bench-real-guests bench-placement clean

all: test

$(STAMP): pyproject.toml scripts/bootstrap scripts/build-guest
	scripts/bootstrap

# The package test (tests/deb) installs the .deb this builds, then purges it.
test: $(STAMP) lint typecheck deb pytest

# dist/ksmpolicy_<version>_all.deb with debhelper and pybuild; lintian errors fail it. Needs
# only debian/control's Build-Depends (it installs them), not the developer setup.
deb:
	scripts/build-deb

# The quick loop while developing: lint, types, and every test that needs no root, no daemon
# and no real KSM (about a minute here). `make test` runs everything; CI runs `make test`.
test-fast: $(STAMP) lint typecheck
	$(BIN)/pytest -m "not root and not kernel and not slow" -p no:cacheprovider

lint: $(STAMP) docs-check
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# Every benchmark figure in the README and docs/ is what bench/results/*.json say (bench/docs.py);
# `$(BIN)/python -m bench.docs --write` rewrites them after a benchmark run.
docs-check: $(STAMP)
	$(BIN)/python -m bench.docs

typecheck: $(STAMP)
	$(BIN)/mypy

pytest: $(STAMP)
	$(BIN)/pytest

demo: $(STAMP)
	demo/run

bench: bench-policy bench-discovery bench-libvirt bench-status bench-pagemap bench-estimate bench-zero-pages bench-domains bench-procevents bench-real-guests bench-placement bench-ksm

bench-policy: $(STAMP)
	$(BIN)/python -m bench.bench_policy

clean:
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache .hypothesis build dist *.egg-info

bench-discovery: $(STAMP)
	$(BIN)/python -m bench.bench_discovery

bench-libvirt: $(STAMP)
	$(BIN)/python -m bench.bench_libvirt

bench-status: $(STAMP)
	$(BIN)/python -m bench.bench_status

bench-pagemap: $(STAMP)
	$(BIN)/python -m bench.bench_pagemap

bench-estimate: $(STAMP)
	$(BIN)/python -m bench.bench_estimate

# Two "web" and one "database" guest holding a real Debian userspace (scripts/build-guest-real).
# Placement by sharing: sketch size and error against K, the cost of sketch, place, rebalance.
bench-placement: $(STAMP)
	$(BIN)/python -m bench.bench_placement

bench-real-guests: $(STAMP)
	$(BIN)/python -m bench.bench_real_guests

# Trust domains: the audit's cost, a hand-over between two domains, zero pages (root).
bench-domains: $(STAMP)
	$(BIN)/python -m bench.bench_domains

# Instant discovery: a VMM's exec to the daemon's sprint, with and without process events (root).
bench-procevents: $(STAMP)
	$(BIN)/python -m bench.bench_procevents

# use_zero_pages off against on, on the pacing benchmark's workload and Windows-like guests.
bench-zero-pages: $(STAMP)
	$(BIN)/python -m bench.zero_pages

# The pacing benchmark against ksmtuned, the kernel advisor and kernel defaults, on the staggered
# timeline and with every guest starting at once (~70 min, root).
bench-ksm: $(STAMP)
	$(BIN)/python -m bench.ksm_bench
	$(BIN)/python -m bench.ksm_bench --name ksm-all-at-once --workload all_at_once=1 \
		--workload churn_start=120 --workload b_stop=150 --workload end=200 \
		--contenders ksmpolicy,ksmpolicy-no-notes,kernel-defaults,ksmtuned,ksmtuned-pve,advisor,advisor-warm
	$(BIN)/python -m bench.ksm_real
