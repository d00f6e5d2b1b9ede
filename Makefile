# The two commands of README.md. Both install the environment (.venv) first if needed.
.PHONY: run test install docs lint

install:
	@bash scripts/install.sh

run: install
	@bash scripts/run_default.sh

test: install
	@bash scripts/test.sh

docs: install
	@.venv/bin/python -m hstu.docs_gen

lint: install
	@.venv/bin/ruff check hstu tests scripts
