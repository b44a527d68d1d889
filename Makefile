# Every target bootstraps .venv on first use (tools/bootstrap.sh; quick when done).
PY := .venv/bin/python
OUT ?= output/demo

.PHONY: env demo test bench clean

env:
	@tools/bootstrap.sh

# A shapes 10+10 class-incremental run on the CPU, with per-stage AP.
demo: env
	$(PY) tools/train_incremental.py --stages 10+10 --method ilmil --output-dir $(OUT)

test: env
	$(PY) -m pytest -q tests

# A benchmark suite (accuracy | ablation | speed | pruning): records and tables in benchmarks/results/;
# BENCH_ARGS=--quick for the short one, BENCH_ARGS="--jobs 2" to train two accuracy/ablation runs at once.
SUITE ?= accuracy
bench: env
	$(PY) benchmarks/run.py --suite $(SUITE) $(BENCH_ARGS)

clean:
	rm -rf output .pytest_cache
