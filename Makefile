# Two commands do everything on a fresh machine: `make demo` and `make test`.
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# The emoji dataset's images and names, and the browser that the report test looks at the page with.
APT_PACKAGES := fonts-noto-color-emoji chromium

.PHONY: setup demo test test-fast lint format bench-robustness clean

setup: $(STAMP)

# System packages come first and never stop the build: without root or sudo the tests that need them skip and say
# why. Python packages install at the exact versions tested (constraints.txt); pyproject.toml keeps ranges.
$(STAMP): pyproject.toml constraints.txt
	@missing=$$(for pkg in $(APT_PACKAGES); do dpkg -s $$pkg >/dev/null 2>&1 || echo $$pkg; done); \
	if [ -n "$$missing" ]; then \
	  echo "installing $$missing (Debian)"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || { sudo -n true 2>/dev/null && echo sudo; } || echo none ); \
	  if [ "$$SUDO" = none ]; then echo "warning: cannot install $$missing without root: the tests that need it skip"; \
	  else $$SUDO apt-get install -y $$missing >/dev/null 2>&1 || { $$SUDO apt-get update >/dev/null && \
	    $$SUDO apt-get install -y $$missing >/dev/null; } || echo "warning: could not install $$missing"; fi; \
	fi
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q -c constraints.txt -e ".[test,hf]"
	$(PY) -c "import mmdistill, torch, torchvision, timm"
	touch $(STAMP)

demo: setup
	$(VENV)/bin/mmdistill demo

# The full suite; `make test-fast` is the quick loop (under two minutes) without the tests marked slow.
test: setup
	$(PY) -m pytest -q

test-fast: setup
	$(PY) -m pytest -q -m "not slow"

lint: setup
	$(VENV)/bin/ruff check src tests
	$(VENV)/bin/ruff format --check src tests

format: setup
	$(VENV)/bin/ruff check --fix src tests
	$(VENV)/bin/ruff format src tests

# The robustness benchmark's real captioned set comes from Debian's Tux Paint stamps (about 220 MB installed).
bench-robustness: setup
	@dpkg -s tuxpaint-stamps-default >/dev/null 2>&1 || { SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get install -y tuxpaint-stamps-default >/dev/null || { $$SUDO apt-get update >/dev/null && \
	  $$SUDO apt-get install -y tuxpaint-stamps-default >/dev/null; }; }
	$(VENV)/bin/mmdistill bench robustness --out runs/robustness

clean:
	rm -rf $(VENV) runs
