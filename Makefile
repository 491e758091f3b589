# The two commands of this repository: `make book` and `make test`.
# Both create .venv from requirements.txt when it is missing or out of date.

VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
MATHJAX_VERSION := 3.2.2
MATHJAX := _static/mathjax/tex-chtml.js

.PHONY: book test lint unit notebooks clean

$(STAMP): requirements.txt pyproject.toml
	test -x $(BIN)/python || python3 -m venv $(VENV)
	$(BIN)/python -m pip install --disable-pip-version-check -q -r requirements.txt
	touch $(STAMP)

# MathJax 3 served from the book itself, so math renders without a CDN.
# Only tex-chtml.js, its fonts and the TeX extensions it autoloads are kept.
$(MATHJAX):
	rm -rf _static/mathjax $(VENV)/mathjax && mkdir -p $(VENV)/mathjax
	cd $(VENV)/mathjax && npm pack --silent mathjax@$(MATHJAX_VERSION) >/dev/null \
	    && tar -xzf mathjax-$(MATHJAX_VERSION).tgz
	mkdir -p _static/mathjax/output/chtml/fonts _static/mathjax/input/tex
	cp $(VENV)/mathjax/package/es5/tex-chtml.js _static/mathjax/
	cp -r $(VENV)/mathjax/package/es5/output/chtml/fonts/woff-v2 \
	    _static/mathjax/output/chtml/fonts/
	cp -r $(VENV)/mathjax/package/es5/input/tex/extensions _static/mathjax/input/tex/
	cp -r $(VENV)/mathjax/package/es5/ui $(VENV)/mathjax/package/es5/a11y \
	    $(VENV)/mathjax/package/es5/sre _static/mathjax/

book: $(STAMP) $(MATHJAX)
	$(BIN)/jupyter-book build . -W -n --keep-going

lint: $(STAMP)
	$(BIN)/python -m ruff check attn_lib tests book

unit: $(STAMP)
	$(BIN)/python -m pytest -n 2 --dist loadfile tests

notebooks: $(STAMP)
	$(BIN)/python -m pytest -n 2 --dist loadfile --nbval book --nbval-sanitize-with tests/sanitize.cfg

test: $(STAMP)
	$(BIN)/python -m ruff check attn_lib tests book
	$(BIN)/python -m pytest -n 2 --dist loadfile tests book --nbval --nbval-sanitize-with tests/sanitize.cfg

clean:
	rm -rf _build _static/mathjax
