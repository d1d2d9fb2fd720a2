# sensor-anomaly: developer and CI entry points. `make help` lists them.
SHELL := /bin/bash
PY := .venv/bin/python
export PYTHONUNBUFFERED := 1

.PHONY: help setup demo test test-unit bench quality lint kafka-up kafka-down clean

help: ## list targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-12s %s\n", $$1, $$2}'

setup: ## create/reuse the Python environment, fetch the Kafka jars, install Prometheus (for the e2e tests)
	@scripts/venv.sh >/dev/null
	@deploy/kafka/fetch-jars.sh >/dev/null
	@scripts/install-prometheus.sh >/dev/null

demo: setup ## run the whole pipeline locally (DEMO_SECONDS=N to stop by itself)
	$(PY) -m streams.cli demo

test: setup ## every test: unit, real Kafka integration, real Prometheus e2e
	$(PY) -m pytest

test-unit: setup ## unit tests only (no servers, seconds)
	$(PY) -m pytest tests/unit anomaly streams

bench: setup ## throughput, latency, memory and recovery benchmarks (each prints a JSON last line)
	$(PY) benchmarks/bench_core.py
	$(PY) benchmarks/bench_e2e.py
	$(PY) benchmarks/bench_recovery.py

quality: setup ## detection quality on NAB, SKAB and MSL, ours vs River's HalfSpaceTrees (about 5 min)
	$(PY) benchmarks/quality.py --markdown benchmarks/RESULTS.md

lint: setup ## ruff
	$(PY) -m ruff check .

kafka-up: setup ## start a local single-node KRaft broker in the background
	$(PY) -m streams.dev.localkafka up

kafka-down: ## stop the local broker
	$(PY) -m streams.dev.localkafka down

clean: ## remove caches in the repo (not the shared environment)
	rm -rf .pytest_cache .ruff_cache .hypothesis
