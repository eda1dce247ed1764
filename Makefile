# The two commands a new machine needs: `make demo` and `make test`.
# Everything they need is installed here: virtualenvs for the newest Twisted and for
# Debian 12's Twisted 22.4, and (when run as root) the Debian packages the tests talk to.

PYTHON ?= python3
VENV := .venv
VENV22 := .venv-tw22
DEMO_CONFIG := etc/demo/appliance.toml
# Real peers the integration tests start on loopback, and the Debian packaging toolchain.
DEB_PACKAGES := bind9 bind9-utils bind9-dnsutils swaks postfix slapd ldap-utils fetchmail \
	debhelper dh-python pybuild-plugin-pyproject python3-all python3-hatchling \
	lintian fakeroot dpkg-dev
PYTEST_ARGS ?= -n auto --dist loadfile

.PHONY: demo test check deps venvs deb clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e '.[test,check]'
	touch $@

$(VENV22)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV22)
	$(VENV22)/bin/pip install -q --upgrade pip
	$(VENV22)/bin/pip install -q 'twisted==22.4.0' -e '.[test]'
	touch $@

venvs: $(VENV)/.installed $(VENV22)/.installed

deps:
	@missing=$$(for p in $(DEB_PACKAGES); do dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q 'install ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
		if [ "$$(id -u)" = 0 ]; then \
			echo "installing Debian packages:" $$missing; \
			echo "postfix postfix/main_mailer_type select No configuration" | debconf-set-selections; \
			apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $$missing; \
		else \
			echo "missing Debian packages (tests that need them are skipped):" $$missing; \
		fi; \
	fi

check: $(VENV)/.installed
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

test: deps venvs check
	$(VENV)/bin/python -b -m pytest $(PYTEST_ARGS)
	$(VENV22)/bin/python -b -m pytest $(PYTEST_ARGS) -m 'not package'

demo: $(VENV)/.installed
	mkdir -p var/demo
	$(VENV)/bin/appliance check --config $(DEMO_CONFIG)
	$(VENV)/bin/twistd --nodaemon --pidfile=var/demo/twistd.pid --logger=appliance.logs.observer appliance --config $(DEMO_CONFIG)

# The Debian package, built with the system Python (a pyenv python3 first in PATH breaks pybuild).
deb:
	env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=$$HOME dpkg-buildpackage -us -uc -b

clean:
	rm -rf var build dist *.egg-info .hypothesis .mypy_cache .ruff_cache
