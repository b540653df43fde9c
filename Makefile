# The two commands a fresh clone needs: `make demo` and `make test`.
# Everything else here is what they stand on.

VENV    := .venv
PY      := $(VENV)/bin/python
KW      := $(VENV)/bin/kafkaworkers
STAMP   := $(VENV)/.installed
BROKER  := bash scripts/kafka/broker.sh
CLUSTER := bash scripts/kafka/cluster.sh
LOCAL_BROKER := 127.0.0.1:19092

.PHONY: install demo test unit test-cluster kafka-up kafka-down kafka-stop kafka-start kafka-cluster-up kafka-cluster-down \
	chaos bench lint clean

$(STAMP): pyproject.toml plugins/pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	$(PY) -m pip install -q -e '.[test]' -e ./plugins
	touch $@

install: $(STAMP)

## Run the order pipeline end to end on the embedded in-memory broker.
demo: install
	$(KW) demo

## Start a local broker unless KAFKAWORKERS_BOOTSTRAP_SERVERS names one, run every test, stop it.
test: install
	@if [ -n "$$KAFKAWORKERS_BOOTSTRAP_SERVERS" ]; then \
	    echo "using the broker at $$KAFKAWORKERS_BOOTSTRAP_SERVERS"; \
	    $(PY) -m pytest $(PYTEST_ARGS); \
	else \
	    $(BROKER) up || exit 1; \
	    KAFKAWORKERS_BOOTSTRAP_SERVERS=$(LOCAL_BROKER) $(PY) -m pytest $(PYTEST_ARGS); status=$$?; \
	    $(BROKER) down; \
	    exit $$status; \
	fi

## The scale-out scenarios (the `cluster` marker; `make test` runs them too): as root, they start
## their own three brokers and PostgreSQL on a bridge and run the services in network namespaces.
test-cluster: install
	$(PY) -m pytest -m cluster tests/cluster $(PYTEST_ARGS)

## Only the tests that need no broker.
unit: install
	$(PY) -m pytest -m 'not kafka' $(PYTEST_ARGS)

## The long fault-injection runs (the `chaos` marker) on the local broker; `make test` runs their short versions.
chaos: install
	$(BROKER) up
	KAFKAWORKERS_BOOTSTRAP_SERVERS=$(LOCAL_BROKER) KAFKAWORKERS_CHAOS_SCALE=4 $(PY) -m pytest -m chaos tests/integration; status=$$?; $(BROKER) down; exit $$status

## Side-by-side throughput: kafkaworkers against a hand-written confluent-kafka loop.
bench: install
	$(BROKER) up
	$(PY) bench/run.py --bootstrap-servers $(LOCAL_BROKER); status=$$?; $(BROKER) down; exit $$status

kafka-up:
	$(BROKER) up

kafka-down:
	$(BROKER) down

## Three brokers in KRaft mode, each a controller too, on 127.0.0.1:29092-29094 (scripts/kafka/cluster.sh).
kafka-cluster-up:
	$(CLUSTER) up

kafka-cluster-down:
	$(CLUSTER) down

## Stop and start the broker keeping its data (fault tests use the script directly).
kafka-stop:
	$(BROKER) stop

kafka-start:
	$(BROKER) start

## Lint and type-check (mypy --strict on kafkaworkers/, configured in pyproject.toml); needs no broker.
lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

clean: kafka-down kafka-cluster-down
	rm -rf $(VENV) .cache build *.egg-info
