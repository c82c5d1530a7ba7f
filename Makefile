# Front door. `make demo` and `make test` each set up everything they need on a
# fresh machine (scripts/setup.sh), then run.
JOBS ?= $(shell nproc)
VENV ?= $(or $(KVQ_CACHE),$(HOME)/.cache/kvq)/venv
DEMO_PROMPT ?= The three most important things to pack for a long hike are

.PHONY: setup setup-dev build demo test test-unit test-asan test-fuzz test-model fuzz report clean

setup:
	scripts/setup.sh

setup-dev:
	scripts/setup.sh --dev

build: setup
	cmake --preset release >/dev/null
	cmake --build build -j $(JOBS)

demo: build
	./build/kvq run -p "$(DEMO_PROMPT)" -n 48

test: setup-dev
	$(MAKE) --no-print-directory test-unit test-asan test-fuzz test-model

test-unit:
	cmake --preset release >/dev/null
	cmake --build build -j $(JOBS)
	ctest --test-dir build -L unit --output-on-failure

# The unit tests again under AddressSanitizer + UndefinedBehaviorSanitizer.
test-asan:
	cmake --preset asan >/dev/null
	cmake --build build-asan -j $(JOBS) --target kvq_unit_tests
	ctest --test-dir build-asan -L unit --output-on-failure

# Replays the fuzz corpus (seeds and any crashers) through the libFuzzer target.
test-fuzz:
	cmake --preset fuzz >/dev/null
	cmake --build build-fuzz -j $(JOBS) --target fuzz_gguf
	ctest --test-dir build-fuzz -L fuzz --output-on-failure

# Against independent references (llama.cpp, numpy over gguf) on the real model.
test-model:
	$(VENV)/bin/python -m pytest tests/model -q

# A fuzzing session: FUZZ_SECONDS of libFuzzer on the GGUF reader; new crashers land in tests/fuzz/corpus.
FUZZ_SECONDS ?= 600
fuzz:
	cmake --preset fuzz >/dev/null
	cmake --build build-fuzz -j $(JOBS) --target fuzz_gguf
	mkdir -p build-fuzz/corpus
	./build-fuzz/fuzz_gguf -max_total_time=$(FUZZ_SECONDS) -rss_limit_mb=2048 -max_len=65536 \
	  -artifact_prefix=tests/fuzz/corpus/crash- build-fuzz/corpus tests/fuzz/corpus

# Figures (docs/figures/) and the generated section of docs/RESULTS.md from the JSON
# files of kvq bench, scripts/baseline_hf.py and kvq ppl under docs/results/.
report:
	@$(VENV)/bin/python -c 'import matplotlib' 2>/dev/null || scripts/setup.sh --dev
	$(VENV)/bin/python scripts/report.py --results docs/results --figures docs/figures --doc docs/RESULTS.md

clean:
	rm -rf build build-asan build-fuzz
