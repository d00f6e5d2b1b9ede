# The two commands of README.md. Both install the environment (.venv) first if needed.
.PHONY: run test test-slow install docs lint

install:
	@bash scripts/install.sh

run: install
	@bash scripts/run_default.sh

test: install
	@bash scripts/test.sh

# the slow tier (long end-to-end variants); CI runs it after `make test`
test-slow: install
	@bash scripts/test.sh --slow

docs: install
	@.venv/bin/python -m hstu.docs_gen

lint: install
	@.venv/bin/ruff check hstu tests scripts
