# Two commands do all the set-up: `make run` (the main job) and `make test` (the test suite).
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
WS     ?= runs/emoji
# the emoji encoder: SynCo, then `cdir adapt` (emoji_adapted.pt, 128 px), distilled without labels
# into its own trunk at 64 px from its 192 px features (README, sections 7 and 8)
ENCODER ?= ckpt:encoders/weights/emoji_student.pt

.PHONY: run test lint bench gpu clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $@

NORMALIZE ?= domain-whiten
RERANK  ?= csls,dual-softmax

# Emoji gallery -> embeddings -> index (per-domain whitened) -> every directed domain pair, plain
# and with the label-free per-domain normalisation and hubness corrections (CSLS, the dual
# softmax) side by side, on the test categories
# (what the README reports) and on all categories -> reports.
run: $(BIN)/.installed
	$(BIN)/cdir data emoji -w $(WS)
	$(BIN)/cdir embed -w $(WS) --encoder "$(ENCODER)"
	$(BIN)/cdir index build -w $(WS) --encoder "$(ENCODER)" --type flat --normalize $(NORMALIZE)
	for split in test all; do \
	    $(BIN)/cdir eval -w $(WS) --encoder "$(ENCODER)" --normalize none,$(NORMALIZE) \
	        --rerank none,$(RERANK) --split $$split --examples 4 || exit 1; done

test: $(BIN)/.installed
	$(BIN)/python -m pytest -q -m "not slow"

lint: $(BIN)/.installed
	$(BIN)/ruff check .

bench: $(BIN)/.installed
	$(BIN)/python bench/bench_eval.py

# Swap faiss-cpu for the GPU build (both import as `faiss`, so never keep both).
gpu: $(BIN)/.installed
	$(BIN)/python -m pip uninstall -y faiss-cpu
	$(BIN)/python -m pip install -e ".[gpu]"

clean:
	rm -rf $(VENV) runs
