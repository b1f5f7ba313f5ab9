# Two commands a new user needs: `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
# torch is installed first and pinned: on CPU machines 2.13.0 is a local CPU wheel,
# and anything unpinned would pull a multi-GB CUDA build.
TORCH_SPEC ?= torch==2.13.0
DEMO_RUN ?= runs/demo
DEMO_ARGS ?=

.PHONY: venv install install-test chromium demo demo-s3 lint test test-fast test-services bench digits-study inc-study molecules-study layout-study clean cluster-up cluster-down

$(VENV)/.created:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip setuptools wheel
	touch $@

$(VENV)/.torch: $(VENV)/.created
	$(PIP) install -q "$(TORCH_SPEC)"
	touch $@

# DeepSpeed's setup.py imports torch, so it builds against the torch already installed. Its CPU
# communication op is built here, once, rather than by the first train rank of every run
# (cluster/deepspeed_ops.py: a build killed half-way is redone, never waited on). It builds while
# pip installs the rest (the script needs only torch and DeepSpeed), which mostly waits on downloads.
$(VENV)/.installed: $(VENV)/.torch pyproject.toml
	$(PIP) install -q --no-build-isolation "deepspeed>=0.15"
	@$(PY) cluster/deepspeed_ops.py > $(VENV)/deepspeed-ops.log 2>&1 & op=$$!; \
	$(PIP) install -q -e .; installed=$$?; \
	wait $$op; built=$$?; cat $(VENV)/deepspeed-ops.log; \
	test $$installed -eq 0 -a $$built -eq 0
	touch $@

# The test extras (pytest, DuckDB, moto's S3 server, import-linter): everything but `make demo`
# needs them (demo-s3 and the loopback rig run moto's server).
$(VENV)/.installed-test: $(VENV)/.installed
	$(PIP) install -q -e ".[test]"
	touch $@

venv: $(VENV)/.created
install: $(VENV)/.installed-test
install-test: $(VENV)/.installed-test

# Two P-GRAFT rounds of the embedded default (pretraining its classifier and DDPM base first if
# models/digits-small is missing): prints a table per round and writes $(DEMO_RUN)/report.html.
# About 2 min on 2 cores, plus 1.5-2 min of install on a fresh clone (README, "The digits task").
demo: $(VENV)/.installed  # the runtime alone: the demo needs no test extra
	$(VENV)/bin/pgraft demo --config configs/digits.yaml --set run.rounds=2 --set run.uri=$(DEMO_RUN) $(DEMO_ARGS)

# The same against S3: a moto S3 server on loopback holds the task's models and the run (both
# made from scratch: pretraining included); the report is written to ./demo-report.html.
demo-s3: $(VENV)/.installed-test
	$(PY) -m cluster.local_s3 --bucket pgraft-demo -- $(VENV)/bin/pgraft demo --config configs/digits.yaml \
	  --set run.rounds=2 --set run.uri=s3://pgraft-demo/runs/demo --set task.dir=s3://pgraft-demo/models/digits-small $(DEMO_ARGS)

# The report test renders a page in headless Chromium: Debian's package, installed when missing.
chromium:
	@command -v chromium > /dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium > /dev/null; } \
	  || { echo "make test needs Debian's chromium (apt-get install chromium, as root)"; exit 1; }

# Tiers (README, "Developing"). test-fast: the unit tier, which starts no service (no Ray, S3 server,
# loopback rig, DeepSpeed or browser; tests/conftest.py refuses any start), in a few minutes.
# test-services: every test that starts one. test: lint-imports (the layers pipelines -> stages ->
# cluster -> pgraft, independent stages), then the unit tier, so a broken unit fails early, then the rest.
PYTEST_ARGS ?=
lint: $(VENV)/.installed-test
	$(VENV)/bin/lint-imports

test-fast: $(VENV)/.installed-test
	$(PY) -m pytest -q --tier unit --durations=10 $(PYTEST_ARGS) tests

# The loopback-rig tests (marker `cluster`) and those marked `beside` mostly wait (job submissions,
# restarts, chaos, outages): they run in a second pytest process beside the rest, and their log is
# printed when both are done. Each process has its own S3 server and Ray, and every kill is scoped
# to a test's own processes.
RIG_LOG ?= .pytest_cache/cluster-tier.log
test-services: $(VENV)/.installed-test chromium
	@mkdir -p $(dir $(RIG_LOG))
	@$(PY) -m pytest -q --tier services -m "cluster or beside" --durations=10 -p no:cacheprovider $(PYTEST_ARGS) tests \
	  > $(RIG_LOG) 2>&1 & rig=$$!; \
	$(PY) -m pytest -q --tier services -m "not cluster and not beside" --durations=25 $(PYTEST_ARGS) tests; rest=$$?; \
	wait $$rig; rigs=$$?; \
	echo "---- the cluster and beside tests (run beside the above; $(RIG_LOG)) ----"; cat $(RIG_LOG); \
	test \( $$rest -eq 0 -o $$rest -eq 5 \) -a \( $$rigs -eq 0 -o $$rigs -eq 5 \)  # 5: no test selected (PYTEST_ARGS)

test: lint test-fast test-services

bench: $(VENV)/.installed-test
	$(PY) benchmarks/generate_overhead.py

# GRAFT vs P-GRAFT at each captured t on the same accepted samples, 3 seeds (~30 min on 2
# cores; needs models/digits). Writes benchmarks/results/digits_study.{json,md,png}.
digits-study: $(VENV)/.installed-test
	$(PY) benchmarks/digits_study.py

# Inverse Noise Correction study (docs/DESIGN.md §5): ~35 min on 2 cores; needs models/digits
# (`$(VENV)/bin/pgraft pretrain digits --out models/digits`). Writes benchmarks/results/inc_study.*
inc-study: $(VENV)/.installed-test
	$(PY) benchmarks/inc_study.py

# Dedup GRS on molecules (best-of-8 / threshold, with and without dedup, 3 rounds, 3 seeds) and
# GRAFT vs P-GRAFT at two t (docs/DESIGN.md §6b): ~30 min on 2 cores; pretrains models/molecules
# first when missing (~3 min). Writes benchmarks/results/molecules_dedup.{json,md,png}.
layout-study: $(VENV)/.installed-test
	test -f models/page_layout/summary.json || $(VENV)/bin/pgraft pretrain page_layout --out models/page_layout --quiet
	$(PY) benchmarks/layout_study.py --models models/page_layout

molecules-study: $(VENV)/.installed-test
	test -f models/molecules/summary.json || $(VENV)/bin/pgraft pretrain molecules --out models/molecules --quiet
	$(PY) benchmarks/molecules_dedup.py --models models/molecules

# A two-node Ray cluster on this machine (head without CPUs + a worker node with the custom
# resource gpu_node): `eval "$$(make -s cluster-up)"` exports RAY_ADDRESS, RAY_API_SERVER_ADDRESS,
# RAY_AUTH_MODE and RAY_AUTH_TOKEN; then `ray job submit --working-dir . -- python x.py`.
# Stops only this rig's processes (state in runs/.loopback-cluster.json), never `ray stop`.
CLUSTER_ARGS ?=
cluster-up: $(VENV)/.installed-test
	@$(PY) -m cluster.loopback up $(CLUSTER_ARGS)

cluster-down:
	@$(PY) -m cluster.loopback down

clean:
	rm -rf $(VENV) runs .pytest_cache
