# The two commands of the README. Both set everything up first (idempotent, see scripts/setup.sh).
.PHONY: setup serve test lint bench

setup:
	@bash scripts/setup.sh

serve: setup
	.venv/bin/python server.py $(ARGS)

test: setup
	.venv/bin/python -m pytest $(ARGS)

lint: setup
	.venv/bin/ruff check . && .venv/bin/ruff format --check .

bench: setup
	.venv/bin/python -m miotts_stream.bench.codec
