# The two commands of this repository: `make book` and `make test`.
# Both create .venv from requirements.txt when it is missing or out of date.

VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
MATHJAX_VERSION := 3.2.2
MATHJAX_DIR := _vendor/mathjax
MATHJAX := $(MATHJAX_DIR)/tex-chtml.js

.PHONY: book test lint unit notebooks browser-check colab-check clean

$(STAMP): requirements.txt pyproject.toml
	test -x $(BIN)/python || python3 -m venv $(VENV)
	$(BIN)/python -m pip install --disable-pip-version-check -q -r requirements.txt
	touch $(STAMP)

# MathJax 3 served from the book itself, so math renders without a CDN.
# Only tex-chtml.js, its fonts and the TeX extensions it autoloads are kept.
# It lives in _vendor/, not _static/: Jupyter Book adds a <script> tag for every
# .js file under a root _static/ folder, which would load all of MathJax's
# extensions on every page (and break it).
$(MATHJAX):
	rm -rf $(MATHJAX_DIR) $(VENV)/mathjax && mkdir -p $(VENV)/mathjax
	cd $(VENV)/mathjax && npm pack --silent mathjax@$(MATHJAX_VERSION) >/dev/null \
	    && tar -xzf mathjax-$(MATHJAX_VERSION).tgz
	mkdir -p $(MATHJAX_DIR)/output/chtml/fonts $(MATHJAX_DIR)/input/tex
	cp $(VENV)/mathjax/package/es5/tex-chtml.js $(MATHJAX_DIR)/
	cp -r $(VENV)/mathjax/package/es5/output/chtml/fonts/woff-v2 \
	    $(MATHJAX_DIR)/output/chtml/fonts/
	cp -r $(VENV)/mathjax/package/es5/input/tex/extensions $(MATHJAX_DIR)/input/tex/
	cp -r $(VENV)/mathjax/package/es5/ui $(VENV)/mathjax/package/es5/a11y \
	    $(VENV)/mathjax/package/es5/sre $(MATHJAX_DIR)/

book: $(STAMP) $(MATHJAX)
	$(BIN)/jupyter-book build . -W -n --keep-going

# Every built page in headless Chromium (Debian's chromium), served from 127.0.0.1:
# math typeset, images loaded, no errors, links and anchors resolve, launch
# buttons, search. Screenshots go to _build/screenshots. Run after `make book`.
browser-check: $(STAMP)
	$(BIN)/python tests/browser_check.py _build/html --screenshots _build/screenshots

# A chapter run the Colab way: a fresh environment with torch preinstalled, where
# the first cell installs only attn_lib (from a clean copy of this tree).
COLAB_NOTEBOOK ?= book/02_scaled_dot_product.ipynb
colab-check: $(STAMP)
	$(BIN)/python tests/colab_check.py $(COLAB_NOTEBOOK)

lint: $(STAMP)
	$(BIN)/python -m ruff check attn_lib tests book

unit: $(STAMP)
	$(BIN)/python -m pytest -n 2 --dist loadfile tests

notebooks: $(STAMP)
	$(BIN)/python -m pytest -n 2 --dist loadfile --nbval book --nbval-sanitize-with tests/sanitize.cfg

# Unit tests and notebooks run in separate pytest processes: a test module that
# sets an environment variable (TRITON_INTERPRET) must not reach the notebooks.
test: $(STAMP)
	$(BIN)/python -m ruff check attn_lib tests book
	$(BIN)/python -m pytest -n 2 --dist loadfile tests
	$(BIN)/python -m pytest -n 2 --dist loadfile --nbval book --nbval-sanitize-with tests/sanitize.cfg

clean:
	rm -rf _build $(MATHJAX_DIR)
