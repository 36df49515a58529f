# The README's two commands. Each bootstraps .venv first when it is missing or stale.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.seg_methods_ready
CSRC := $(shell find seg_methods/layers/csrc -type f 2>/dev/null)

.PHONY: demo test env clean-env

$(STAMP): requirements.txt setup.py tools/bootstrap.py $(CSRC)
	$(PYTHON) tools/bootstrap.py --venv $(VENV)
	@touch $(STAMP)

env: $(STAMP)

# Main job: generate the embedded dataset if absent, train the default Mask2Former config on the
# CPU, evaluate it (PQ, mIoU, AP), write metrics.json, TensorBoard events and pictures to output/.
demo: $(STAMP)
	$(PY) tools/run_demo.py

# The CPU test suite (.ci/run calls exactly this).
test: $(STAMP)
	$(PY) -m pytest tests -q --durations=15

clean-env:
	rm -rf $(VENV)
