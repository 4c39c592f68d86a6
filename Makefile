# The project root is also the QGIS plugin folder (metadata.txt, __init__.py).

# The system interpreter on purpose: QGIS's Python bindings exist only for it, and a
# python3 found first on PATH (pyenv, conda) would build a venv that cannot see them.
SYSTEM_PYTHON := /usr/bin/python3
VENV := .venv
PYTHON := $(VENV)/bin/python
STAMP := $(VENV)/.requirements-installed

PLUGIN_NAME := csakd_fusion
VERSION := $(shell sed -n 's/^version[[:space:]]*=[[:space:]]*//p' metadata.txt)
DIST_DIR ?= dist
PACKAGE_ZIP := $(DIST_DIR)/$(PLUGIN_NAME)-$(VERSION).zip

# Debian's /usr/bin/qgis_process wrapper adds --noversioncheck, which QGIS 3.22 rejects.
QGIS_PROCESS := /usr/bin/qgis_process.bin
# QGIS 3 and QGIS 4 (Qt6) keep separate profile folders: `make install` fills both default
# profiles, or only QGIS_CUSTOM_CONFIG_PATH's, or only QGIS_PLUGINS_DIR when that is given.
QGIS_DATA_ROOT := $(HOME)/.local/share/QGIS
PROFILE_PLUGINS := profiles/default/python/plugins
QGIS_PLUGINS_DIRS = $(if $(QGIS_PLUGINS_DIR),$(QGIS_PLUGINS_DIR),$(if $(QGIS_CUSTOM_CONFIG_PATH),$(QGIS_CUSTOM_CONFIG_PATH)/$(PROFILE_PLUGINS),$(QGIS_DATA_ROOT)/QGIS3/$(PROFILE_PLUGINS) $(QGIS_DATA_ROOT)/QGIS4/$(PROFILE_PLUGINS)))

# python3-distributed (Dask) and python3-tqdm serve the command line's batches and progress bars;
# python3-torch joins them where the distribution's is recent enough (Debian 13 and newer).
APT_PACKAGES = qgis python3-qgis qgis-providers python3-gdal gdal-bin \
	python3-rasterio python3-pyproj python3-scipy python3-venv xvfb xauth \
	python3-distributed python3-tqdm \
	$(shell $(SYSTEM_PYTHON) scripts/install_torch.py apt-package 2>/dev/null)
SUDO := $(if $(filter 0,$(shell id -u)),,sudo)

TRAIN_ARGS ?=
PYTEST_ARGS ?=
TESTS ?= tests

# Headless Qt everywhere: CI and build machines have no display.
export QT_QPA_PLATFORM ?= offscreen

.PHONY: setup system-packages test test-qgis demo train pack bench package install clean distclean

setup: $(STAMP)

system-packages:
	@if ! $(SYSTEM_PYTHON) -c 'import qgis.core, distributed, tqdm' >/dev/null 2>&1; then \
		echo "QGIS Python bindings, Dask or tqdm missing: installing Debian packages"; \
		$(SUDO) apt-get update && \
		DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y --no-install-recommends $(APT_PACKAGES); \
	fi

# The stamp makes a second `make setup` a no-op until requirements.txt, the torch installer or
# this file (its Debian packages) changes; system-packages is checked inside the recipe (not as
# a prerequisite) so that an unchanged environment does not even start Python.
# numpy is pinned to the distribution's own version (constraints.txt), so no package can
# replace it inside the environment QGIS also loads.
$(STAMP): requirements.txt scripts/install_torch.py Makefile
	@$(MAKE) --no-print-directory system-packages
	@test -x $(PYTHON) || $(SYSTEM_PYTHON) -m venv --system-site-packages $(VENV)
	$(SYSTEM_PYTHON) -c 'import numpy; print("numpy==" + numpy.__version__)' > $(VENV)/constraints.txt
	$(PYTHON) scripts/install_torch.py $(PYTHON)
	$(PYTHON) -m pip install --no-input -r requirements.txt -c $(VENV)/constraints.txt
	@touch $@

test: setup
	$(PYTHON) -m pytest $(TESTS) -v $(PYTEST_ARGS)

# The suite here (QGIS 3.22) and in Debian trixie (3.40) and sid (3.44) chroots with their own
# torch; needs root, a Debian mirror and ~4 GB per chroot (see the script for its variables).
test-qgis:
	scripts/test_qgis_matrix.sh

demo: setup
	$(PYTHON) scripts/demo.py

train: setup
	$(PYTHON) -m csakd_qgis.train $(TRAIN_ARGS)

# The training set in one file (30.8 MiB) for a run on another machine: TRAIN_ARGS="--pack …".
pack: setup
	$(PYTHON) -m csakd_qgis.training_set build/train/training_set.npz

bench: setup
	$(PYTHON) -m csakd_qgis.bench

package:
	@test -n "$(VERSION)" || { echo "no version= line in metadata.txt" >&2; exit 1; }
	$(SYSTEM_PYTHON) scripts/package_plugin.py zip $(PACKAGE_ZIP)

# Installs exactly what the zip holds, so what is tested is what users get.
# A QGIS_PLUGINS_DIR outside the profile also needs QGIS_PLUGINPATH set when QGIS runs.
# python_path.txt tells the installed plugin where torch lives (this venv's site-packages):
# QGIS and qgis_process run the system Python, which has no torch of its own here.
# qgis_process here is QGIS 3's, so it enables the plugin in the first folder; QGIS 4 users
# enable it once in its Plugin Manager.
install: setup package
	@for dir in $(QGIS_PLUGINS_DIRS); do \
		$(SYSTEM_PYTHON) scripts/package_plugin.py install $(PACKAGE_ZIP) "$$dir" && \
		$(PYTHON) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])' > "$$dir/$(PLUGIN_NAME)/python_path.txt" \
		|| exit 1; \
	done
	$(SYSTEM_PYTHON) scripts/package_plugin.py enable $(QGIS_PROCESS) "$(firstword $(QGIS_PLUGINS_DIRS))"

clean:
	rm -rf dist build .pytest_cache .qgis-settings demo_output
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -prune -exec rm -rf {} +

distclean: clean
	rm -rf $(VENV)
