# fsbridge: the two commands an admin needs are `make run` and `make test`.
# Everything lives in .venv inside the checkout; only python3 (3.11 or newer)
# and make are needed on the machine. Another interpreter:
#   make test PYTHON=/usr/bin/python3.13

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
CONFIG ?= conf/local.ini
# The interpreter .venv was made with, recorded in .venv/.python: when PYTHON
# names another one (path or version), .venv is made again from scratch.
PYTHON_ID := $(shell $(PYTHON) -c 'import sys; print(sys.executable, sys.version.split()[0])' 2>/dev/null)
PYWHO  := $(VENV)/.python

.PHONY: run test live-test bench install check clean lame demo FORCE

$(PYWHO): FORCE
	@test -n "$(PYTHON_ID)" || { echo "error: $(PYTHON) not found; install python3 (3.11 or newer) or pass PYTHON=..." >&2; exit 1; }
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || { echo "error: $(PYTHON) is $(PYTHON_ID); fsbridge needs Python 3.11 or newer" >&2; exit 1; }
	@if [ "$$(cat $@ 2>/dev/null)" != "$(PYTHON_ID)" ]; then \
	  if [ -d $(VENV) ]; then echo "$(VENV) was made with another Python; making it again with $(PYTHON_ID)"; fi; \
	  rm -rf $(VENV) && mkdir -p $(VENV) && echo "$(PYTHON_ID)" > $@; \
	fi

# Create the virtualenv and install the package with its test tools.
# The stamp is rebuilt whenever the dependency list or the interpreter changes.
$(STAMP): setup.cfg pyproject.toml $(PYWHO)
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check --upgrade pip
	$(BIN)/python -m pip install -q --disable-pip-version-check -e '.[test]'
	@touch $@

install: $(STAMP)

# First `make run` on a checkout: a private config made from the sample,
# with a fresh PBX token and a state directory inside the checkout.
$(CONFIG): | $(STAMP)
	$(BIN)/fsbridge init-config --out $(CONFIG) --storage-dir var

run: $(STAMP) $(CONFIG)
	$(BIN)/fsbridge run -c $(CONFIG)

check: $(STAMP) $(CONFIG)
	$(BIN)/fsbridge check -c $(CONFIG)

# MP3 conversion of recordings (and its tests) uses lame from Debian. As root
# (CI, a fresh server) it is installed here; otherwise install it yourself.
lame:
	@command -v lame >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing lame (MP3 conversion of recordings)"; \
	    apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq lame >/dev/null; \
	  else \
	    echo "warning: lame not found; MP3 tests will fail: sudo apt-get install lame" >&2; \
	  fi; }

test: $(STAMP) lame
	$(BIN)/python -m pytest -q

# The real service between a fake FreeSWITCH and a fake PlanFix: four calls,
# every PlanFix request printed; no FreeSWITCH, PlanFix or root needed.
demo: $(STAMP)
	$(BIN)/fsbridge demo

# The live suite (tests/live/): a private FreeSWITCH lab (FREESWITCH_PREFIX, default
# /usr/local/freeswitch), SIPp phones and carrier, the real service. Without
# FreeSWITCH or sipp it prints one line saying what is missing and succeeds.
# Real SIP on a shared machine: a failed test runs once more (pytest-rerunfailures);
# the summary line counts it as "rerun", so a flaky scenario stays visible.
live-test: $(STAMP) lame
	@$(BIN)/python -m tests.live.lab >/dev/null; rc=$$?; \
	if [ $$rc = 3 ]; then $(BIN)/python -m tests.live.lab; exit 0; fi; \
	if [ $$rc != 0 ]; then exit $$rc; fi; \
	FSBRIDGE_LIVE=1 $(BIN)/python -m pytest -q -rR --reruns 1 --reruns-delay 2 tests/live

bench: $(STAMP)
	$(BIN)/python -m bench

clean:
	rm -rf $(VENV) build *.egg-info
