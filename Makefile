# The README's two commands: `make demo` (a real fine-tune on the embedded
# default model) and `make test` (the test suite). Both set up .venv themselves.
.PHONY: demo test setup bench

setup:
	@bash scripts/setup.sh

demo: setup
	rm -rf runs/quickstart
	.venv/bin/lorakit train examples/quickstart.yaml
	.venv/bin/lorakit generate runs/quickstart --compare-base --prompts-file examples/heldout_prompts.txt --max-new-tokens 64

test: setup
	.venv/bin/python -m pytest -q -x tests

bench: setup
	.venv/bin/python benchmarks/layer.py
	.venv/bin/python benchmarks/train_step.py
	.venv/bin/python benchmarks/inference.py
