# Two commands: `make test` and `make demo`. Both set up .venv first.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
PY     := $(BIN)/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.installed
DEMO   := data/demo
DEMO_ROWS ?= 6000
DEMO_EPOCHS ?= 8
# The hybrid DeepViT (conv stem, 7 x 7 tokens): on the demo data as good as the ResNet baseline and 2x better
# than the linear-patch DeepViT at the same epochs (docs/training.md, the accuracy study).
DEMO_MODEL ?= hybrid49

.PHONY: setup test demo bench slurm-check clean

setup: $(STAMP)

# torch first and by exact version: pip then takes the CPU wheel from local disk on our machines
# instead of resolving a multi-GB CUDA build. vit-pytorch (the model oracle in the tests) goes in
# with --no-deps because its metadata asks for torchvision, which we neither need nor can import.
$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q -c constraints.txt torch==2.13.0
	$(PIP) install -q -c constraints.txt -e '.[test,export,tensorboard]'
	$(PIP) install -q --no-deps -c constraints.txt vit-pytorch
	touch $@

test: $(STAMP)
	$(BIN)/pytest -q

demo: $(STAMP)
	rm -rf $(DEMO)
	$(PY) -m pipeline.synth $(DEMO)/raw --process top --rows $(DEMO_ROWS) --files 2 --seed 1
	$(PY) -m pipeline.convert $(DEMO)/raw $(DEMO)/top.h5 --cuts top --channels 0,1,2,3,4,5,6,7
	@if command -v h5ls >/dev/null; then h5ls -r $(DEMO)/top.h5; else $(PY) -m pipeline.inspect $(DEMO)/top.h5; fi
	$(PY) -m massreg.train $(DEMO)/top.h5 --model $(DEMO_MODEL) --epochs $(DEMO_EPOCHS) --run-dir $(DEMO)/run --device cpu
	$(PY) -m massreg.evaluate $(DEMO)/run/best_val_loss.pt $(DEMO)/top.h5 --split test --max-mae-ratio 0.35
	mkdir -p $(DEMO)/deploy
	$(PY) -m massreg.export $(DEMO)/run/best_val_loss.pt --out $(DEMO)/deploy/top_mass.onnx
	$(PY) -m massreg.predict --onnx $(DEMO)/deploy/top_mass.onnx $(DEMO)/top.h5 --split test \
		--out $(DEMO)/deploy/test_onnx.csv
	@echo "plots: $(DEMO)/run/plots/ (training) and $(DEMO)/run/eval_test/ (test)"
	@echo "deployable model: $(DEMO)/deploy/top_mass.onnx with its description top_mass.json"

bench: $(STAMP)
	$(PY) benchmarks/bench_convert.py
	$(PY) benchmarks/bench_loader.py
	$(PY) benchmarks/bench_model.py --threads 1
	$(PY) benchmarks/bench_train.py --workers 0,2
	$(PY) benchmarks/bench_export.py

# The shipped Slurm scripts (slurm/) on a private one-node Slurm cluster; root on Debian (installs slurm-wlm and
# munge if missing). Leaves /etc/slurm and /etc/munge as they were and stops every daemon it started.
slurm-check: $(STAMP)
	bash slurm/check.sh

clean:
	rm -rf $(VENV) $(DEMO) *.egg-info
