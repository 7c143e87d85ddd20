# Two commands do everything on a fresh machine: `make demo` and `make test`.
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
APT_PACKAGES := fonts-noto-color-emoji

.PHONY: setup demo test bench-robustness clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	@for pkg in $(APT_PACKAGES); do \
	  dpkg -s $$pkg >/dev/null 2>&1 || { echo "installing $$pkg"; \
	    SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	    $$SUDO apt-get install -y $$pkg >/dev/null || { $$SUDO apt-get update >/dev/null && $$SUDO apt-get install -y $$pkg >/dev/null; }; }; \
	done
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q -e ".[test,hf]"
	$(PY) -c "import mmdistill, torch, torchvision, timm"
	touch $(STAMP)

demo: setup
	$(VENV)/bin/mmdistill demo

test: setup
	$(PY) -m pytest -q

# The robustness benchmark's real captioned set comes from Debian's Tux Paint stamps (about 220 MB installed).
bench-robustness: setup
	@dpkg -s tuxpaint-stamps-default >/dev/null 2>&1 || { SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get install -y tuxpaint-stamps-default >/dev/null || { $$SUDO apt-get update >/dev/null && \
	  $$SUDO apt-get install -y tuxpaint-stamps-default >/dev/null; }; }
	$(VENV)/bin/mmdistill bench robustness --out runs/robustness

clean:
	rm -rf $(VENV) runs
