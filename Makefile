# The two commands of the README. Both run the idempotent set-up first.
.PHONY: setup quickstart test bench gpu-check

setup:
	@bash scripts/setup.sh

quickstart: setup
	.venv/bin/gdnsq quickstart --summary-json out/quickstart.json

test: setup
	.venv/bin/python -m pytest -q

bench: setup
	.venv/bin/python benchmarks/bench_step_overhead.py

gpu-check: setup
	bash benchmarks/gpu_check.sh
