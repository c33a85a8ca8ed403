# Two commands for a fresh machine:
#   make demo   -- the whole pipeline on the built-in digits example
#   make test   -- the test suite
# Each creates ./.venv (if missing) and installs what it needs.

comma := ,
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# A CPU build of torch; the package itself only asks for torch>=2.2.
TORCH ?= torch==2.13.0
# hf (transformers) runs the Hugging Face tests, baselines (captum) the neuron
# conductance and internal influence ones; the ffcv extra compiles against OpenCV, so take it only when the system has it.
EXTRAS := test,slurm,hf,baselines$(shell pkg-config --exists opencv4 2>/dev/null && echo ,ffcv)
DEMO_OUT ?= demo-out
STAMP := $(VENV)/.installed-$(subst $(comma),_,$(EXTRAS))

.PHONY: venv demo test bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "$(TORCH)"
	$(PIP) install -q -e ".[$(EXTRAS)]"
	touch $@

venv: $(STAMP)

demo: venv
	$(VENV)/bin/coar-dask demo --out $(DEMO_OUT)

test: venv
	$(PY) -m pytest $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) $(DEMO_OUT) .pytest_cache
