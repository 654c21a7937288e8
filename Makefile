# The README's two commands: `make demo` (a real fine-tune on the embedded
# default model) and `make test` (the test suite). Both set up .venv themselves.
.PHONY: demo test lint setup bench

setup:
	@bash scripts/setup.sh

demo: setup
	rm -rf runs/quickstart
	.venv/bin/lorakit train examples/quickstart.yaml
	.venv/bin/lorakit generate runs/quickstart --compare-base --prompts-file examples/heldout_prompts.txt --max-new-tokens 64

test: setup lint
	.venv/bin/python -m pytest -q -x tests

lint: setup
	.venv/bin/ruff check src tests benchmarks examples
	.venv/bin/ruff format --check src tests benchmarks examples

bench: setup
	.venv/bin/python benchmarks/layer.py
	.venv/bin/python benchmarks/train_step.py
	.venv/bin/python benchmarks/inference.py
