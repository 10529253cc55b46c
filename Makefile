# Two commands: `make demo` (U-FIRE-mini end to end on CPU) and `make test`. Both create .venv when missing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
TINY := runs/tiny-qwen3vl
MINI := data/ufire-mini

.PHONY: demo test venv clean

venv: $(VENV)/.installed
$(VENV)/.installed: requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	touch $@

$(TINY)/config.json: $(VENV)/.installed fake_backbones.py
	$(PY) fake_backbones.py make-tiny $(TINY)

$(MINI)/0_triplet_files: $(VENV)/.installed prepare_data.py ufire_mini.py
	$(PY) prepare_data.py --out $(MINI)

demo: $(TINY)/config.json $(MINI)/0_triplet_files
	$(PY) train.py configs/tiny.yaml
	$(PY) evaluate.py runs/tiny/best.pt --split test --show 3

test: $(VENV)/.installed
	$(PY) -m pytest -q tests

clean:
	rm -rf runs data
