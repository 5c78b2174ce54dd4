# fsbridge: the two commands an admin needs are `make run` and `make test`.
# Everything lives in .venv inside the checkout; only Python 3.11 and make
# are needed on the machine.

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
CONFIG ?= conf/local.ini

.PHONY: run test live-test bench install check clean lame

# Create the virtualenv and install the package with its test tools.
# The stamp is rebuilt whenever the dependency list changes.
$(STAMP): setup.cfg pyproject.toml
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

# The live suite (tests/live/): a private FreeSWITCH lab (FREESWITCH_PREFIX, default
# /usr/local/freeswitch), SIPp phones and carrier, the real service. Without
# FreeSWITCH or sipp it prints one line saying what is missing and succeeds.
live-test: $(STAMP) lame
	@$(BIN)/python -m tests.live.lab >/dev/null; rc=$$?; \
	if [ $$rc = 3 ]; then $(BIN)/python -m tests.live.lab; exit 0; fi; \
	if [ $$rc != 0 ]; then exit $$rc; fi; \
	FSBRIDGE_LIVE=1 $(BIN)/python -m pytest -q tests/live

bench: $(STAMP)
	$(BIN)/python -m bench

clean:
	rm -rf $(VENV) build *.egg-info
