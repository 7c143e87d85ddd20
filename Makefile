# Two commands do everything on a fresh machine: `make demo` and `make test`.
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
APT_PACKAGES := fonts-noto-color-emoji

.PHONY: setup demo test clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	@for pkg in $(APT_PACKAGES); do \
	  dpkg -s $$pkg >/dev/null 2>&1 || { echo "installing $$pkg"; \
	    SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	    $$SUDO apt-get install -y $$pkg >/dev/null || { $$SUDO apt-get update >/dev/null && $$SUDO apt-get install -y $$pkg >/dev/null; }; }; \
	done
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q -e ".[test]"
	$(PY) -c "import mmdistill, torch, torchvision, timm"
	touch $(STAMP)

demo: setup
	$(VENV)/bin/mmdistill demo

test: setup
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) runs
