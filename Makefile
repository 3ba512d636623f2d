# The two commands of the README:
#   make demo   set up everything, export the Fashion-MNIST demo data, convert it, run recipes/quickstart.toml
#   make test   set up everything, run the test suite
VENV ?= .venv
BIN := $(VENV)/bin
DEMO_SRC ?= data/fashion-mnist
DEMO_OUT ?= data/fashion-mnist-fast
PYTEST_ARGS ?=

.PHONY: setup demo demo-data test test-fast clean-demo

$(VENV)/.fastrefine-setup: pyproject.toml tools/setup.sh
	bash tools/setup.sh
	touch $@

setup: $(VENV)/.fastrefine-setup

demo-data: setup
	$(BIN)/python tools/make_demo_data.py $(DEMO_SRC) --size 64
	$(BIN)/fastrefine convert folder $(DEMO_SRC) $(DEMO_OUT) --max-side 64 --format both

demo: demo-data
	$(BIN)/fastrefine run recipes/quickstart.toml

test: setup
	$(BIN)/python -m pytest tests $(PYTEST_ARGS)

test-fast: setup
	$(BIN)/python -m pytest tests -m "not slow" $(PYTEST_ARGS)

clean-demo:
	rm -rf $(DEMO_SRC) $(DEMO_OUT) runs/quickstart
