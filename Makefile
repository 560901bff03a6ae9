# The two commands of the README. Both run the idempotent set-up first.
.PHONY: setup quickstart test lint bench gpu-check

setup:
	@bash scripts/setup.sh

quickstart: setup
	.venv/bin/gdnsq quickstart --summary-json out/quickstart.json

test: setup lint
	.venv/bin/python -m pytest -q

# Lint and format are part of the test command, so CI holds them (pyproject.toml [tool.ruff] says which rules).
lint: setup
	.venv/bin/ruff check .
	.venv/bin/ruff format --check .

bench: setup
	.venv/bin/python benchmarks/bench_step_overhead.py

gpu-check: setup
	bash benchmarks/gpu_check.sh
