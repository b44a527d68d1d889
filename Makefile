# Every target bootstraps .venv on first use (tools/bootstrap.sh; quick when done).
PY := .venv/bin/python
OUT ?= output/demo

.PHONY: env demo test bench clean

env:
	@tools/bootstrap.sh

# Forgetting and its prevention in ~7 minutes on 2 CPU cores: one teacher of 5 shapes
# classes (configs/shapes/demo.yaml), then 5 new classes learned from it by finetune
# and by ilmil, compared in $(OUT)/report.md.
DEMO := $(PY) tools/train_incremental.py --config-file configs/shapes/demo.yaml
DEMO_STAGE1 := --start-stage 1 --teacher-weights $(OUT)/teacher/stage_0/model_final.pth
demo: env
	$(DEMO) --stages 5 --output-dir $(OUT)/teacher SOLVER.MAX_ITER 600 SOLVER.STEPS "(480,)"
	$(DEMO) --method finetune --output-dir $(OUT)/finetune $(DEMO_STAGE1)
	$(DEMO) --method ilmil --output-dir $(OUT)/ilmil $(DEMO_STAGE1)
	$(PY) tools/compare_runs.py $(OUT)/finetune $(OUT)/ilmil --out $(OUT)

# Each test runs one thread, so the suite's files are spread over worker processes
# (those sharing a module-scoped trained run on one worker: tests/conftest.py).
TEST_WORKERS ?= 2
test: env
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadgroup tests

# A benchmark suite (accuracy | ablation | speed | pruning | stage_images | kd | kd_speed | one_stage; the
# README's "Benchmarks" says what each measures): records and tables in benchmarks/results/;
# BENCH_ARGS=--quick for the short one, BENCH_ARGS="--jobs 2" to train two accuracy/ablation runs at once.
SUITE ?= accuracy
bench: env
	$(PY) benchmarks/run.py --suite $(SUITE) $(BENCH_ARGS)

clean:
	rm -rf output .pytest_cache
