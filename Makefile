# wg-appliance: `make appliance` builds and deploys, `make test` proves it.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
SITE ?=
STATE ?=
export PATH := $(CURDIR)/$(BIN):$(PATH)

.PHONY: setup host-packages appliance test test-fast lint bench lab lab-down clean

setup: host-packages $(VENV)/.installed

# Installs only what is missing, so a ready machine pays a dpkg-query per package.
host-packages:
	@missing=$$(for p in $$(grep -v '^#' images/host-packages.txt); do \
	    dpkg-query -W -f='$${db:Status-Abbrev}' $$p 2>/dev/null | grep -q '^ii' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	    if [ "$$(id -u)" != 0 ]; then echo "missing Debian packages (run as root to install): $$missing"; exit 1; fi; \
	    echo "installing Debian packages: $$missing"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	fi

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

# With no SITE: the image is built here (it needs the package mirror), then the lab comes up
# and the tool runs on its LAN host, as an admin's workstation would: the host's libvirt
# socket out of sight, libvirtd reached through the host's sshd on 222 with its key pinned.
appliance: setup
	$(BIN)/wg-appliance image
ifeq ($(SITE),)
	$(BIN)/python -m tests.lab up
	$(BIN)/python -m tests.lab workstation $(BIN)/wg-appliance up --site examples/site.toml \
	    $$($(BIN)/python -m tests.lab host-flags) $(if $(STATE),--state $(STATE))
	@echo "lab: 'make lab-down' removes it; the appliance is at 192.168.77.50 inside it"
else
	$(BIN)/wg-appliance up --site $(SITE) $(if $(STATE),--state $(STATE))
endif

test: setup
	$(BIN)/pytest -v --timeout=1800 --durations=25 tests

test-fast: setup
	$(BIN)/pytest -q -m 'not slow' tests

lint: setup
	$(BIN)/ruff check builder tests
	$(BIN)/ruff format --check builder tests

bench: setup
	$(BIN)/python -m bench

lab: setup
	$(BIN)/python -m tests.lab up

lab-down: setup
	$(BIN)/python -m tests.lab down

clean:
	rm -rf $(VENV) build out .cache
