# shark-torchrec: the two commands a new user needs.
#   make demo   set up .venv (first time) and run the SHARK pipeline on generated data
#   make test   set up .venv (first time) and run the test suite
VENV ?= .venv
PY := $(VENV)/bin/python
NPROC ?= 2
DEMO_OUT ?= runs/demo

.PHONY: setup setup-gpu demo test clean-venv

setup:
	@VENV=$(VENV) scripts/setup_env.sh

setup-gpu:
	@VENV=$(VENV) scripts/setup_env_gpu.sh

demo: setup
	OMP_NUM_THREADS=1 $(PY) -m torch.distributed.run --standalone --nproc_per_node $(NPROC) \
		recipes/shark_dlrm.py --data synthetic --out $(DEMO_OUT)

test: setup
	$(PY) -m pytest -q

clean-venv:
	rm -rf $(VENV)
