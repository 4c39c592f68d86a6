#!/usr/bin/env bash
# `make test-qgis`: the test suite on this machine's QGIS (Debian 12: QGIS 3.22) and, in
# debootstrap chroots the script creates, on Debian trixie (QGIS 3.40, Python 3.13, python3-torch
# 2.6, numpy 2) and sid (QGIS 3.44, Python 3.14, torch 2.14) with the distributions' own packages.
#
# Needs root (debootstrap, chroot, mounts), network access to a Debian mirror and the Python
# package index, and about 4 GB of disk per chroot. Chroots are kept in build/chroots/<suite> and
# reused; delete a folder to rebuild it. Each chroot gets its own virtual environment
# (.venv-<suite>) in the shared checkout.
#
#   QGIS_SUITES="trixie sid"   which distributions to add (empty: only this machine)
#   HOST_TESTS=0               skip the run on this machine
#   TESTS="tests/test_x.py"    the tests to run (default: all)
#   PYTEST_ARGS="-x"           passed to every run
#   DEBIAN_MIRROR=...          default http://deb.debian.org/debian
set -uo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
shared=$(cd "$root/../shared" 2>/dev/null && pwd) || { echo "../shared not found beside the checkout" >&2; exit 2; }
chroots=${CHROOT_DIR:-$root/build/chroots}
suites=${QGIS_SUITES-trixie sid}
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
pytest_args=${PYTEST_ARGS:-}
tests=${TESTS:-tests}
packages="make qgis python3-qgis qgis-providers python3-gdal gdal-bin python3-rasterio python3-pyproj
python3-scipy python3-venv python3-pip python3-torch python3-distributed python3-tqdm xauth ca-certificates git"

declare -a summary=()
status=0

record() {  # record <label> <exit status>
    if [ "$2" -eq 0 ]; then summary+=("$1: passed"); else summary+=("$1: FAILED (exit $2)"); status=1; fi
}

if [ "${HOST_TESTS:-1}" != 0 ]; then
    echo "== this machine: $(/usr/bin/qgis_process.bin --version 2>/dev/null | grep -m1 QGIS)"
    make -C "$root" --no-print-directory test TESTS="$tests" PYTEST_ARGS="$pytest_args"
    record "this machine ($(/usr/bin/qgis_process.bin --version 2>/dev/null | grep -m1 QGIS))" $?
fi

[ -z "$suites" ] || [ "$(id -u)" -eq 0 ] || { echo "the chroots need root" >&2; exit 2; }

for suite in $suites; do
    dir=$chroots/$suite
    if [ ! -e "$dir/.ready" ]; then
        echo "== creating the $suite chroot in $dir"
        command -v debootstrap >/dev/null || DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends debootstrap
        mkdir -p "$dir"
        # A base system left by an earlier, interrupted run is reused. Snapshot mirrors (and a
        # clock ahead of the mirror's) serve Release files past their Valid-Until date: the
        # signature is still checked, only that date is not.
        if { [ ! -x "$dir/usr/bin/apt-get" ] && ! debootstrap --variant=minbase "$suite" "$dir" "$mirror"; } ||
           ! chroot "$dir" apt-get -o Acquire::Check-Valid-Until=false update ||
           ! chroot "$dir" env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends $packages; then
            record "$suite (chroot could not be created)" 1
            continue
        fi
        touch "$dir/.ready"
    fi
    mkdir -p "$dir/m/project" "$dir/m/shared"
    cp /etc/resolv.conf "$dir/etc/resolv.conf"
    # A network that intercepts TLS has its CA in this machine's bundle, not in the chroot's.
    cp /etc/ssl/certs/ca-certificates.crt "$dir/etc/ssl/certs/host-ca-certificates.crt"
    mount -t proc proc "$dir/proc"
    mount -t tmpfs tmpfs "$dir/dev/shm"
    mount --bind "$root" "$dir/m/project"
    mount --bind "$shared" "$dir/m/shared"
    version=$(chroot "$dir" /usr/bin/qgis_process --version 2>/dev/null | grep -m1 QGIS)
    echo "== $suite: $version"
    # The selection travels in the environment, so quotes inside PYTEST_ARGS survive.
    chroot "$dir" env -i HOME=/root PATH=/usr/sbin:/usr/bin:/sbin:/bin QT_QPA_PLATFORM=offscreen \
        SUITE="$suite" TESTS="$tests" PYTEST_ARGS="$pytest_args" PIP_CERT=/etc/ssl/certs/host-ca-certificates.crt \
        bash -c 'cd /m/project && make --no-print-directory test VENV=".venv-$SUITE" TESTS="$TESTS" PYTEST_ARGS="$PYTEST_ARGS"'
    record "$suite ($version)" $?
    umount "$dir/m/shared" "$dir/m/project" "$dir/dev/shm" "$dir/proc"
done

echo
echo "== make test-qgis"
printf '%s\n' "${summary[@]}"
exit $status
