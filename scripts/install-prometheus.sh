#!/usr/bin/env bash
# Install the Prometheus server and promtool (Debian package `prometheus`) for the deploy tests.
#
# Idempotent: does nothing when both binaries are already on PATH. Needs root (CI runs as root) or
# passwordless sudo; otherwise it says so and exits 0, and tests/integration/test_deploy.py skips with that reason.
# The package's own service is never started here (no systemd in CI; the tests start their own server).
set -euo pipefail

say() { printf 'install-prometheus: %s\n' "$*"; }

if command -v prometheus >/dev/null 2>&1 && command -v promtool >/dev/null 2>&1; then
    say "already installed: $(command -v prometheus) ($(prometheus --version 2>&1 | head -n1))"
    exit 0
fi

if [ "$(id -u)" -eq 0 ]; then
    SUDO=()
elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
    SUDO=(sudo -n)
else
    say "not root and no passwordless sudo: cannot install; the Prometheus tests will be skipped"
    exit 0
fi

if ! command -v apt-get >/dev/null 2>&1; then
    say "no apt-get on this machine: cannot install; the Prometheus tests will be skipped"
    exit 0
fi

export DEBIAN_FRONTEND=noninteractive
# Keep the package's init script from trying to start a system-wide server on :9090.
policy=/usr/sbin/policy-rc.d
created_policy=0
if [ ! -e "$policy" ]; then
    say "writing $policy (exit 101) so the package does not start its service"
    printf '#!/bin/sh\nexit 101\n' | "${SUDO[@]}" tee "$policy" >/dev/null
    "${SUDO[@]}" chmod 755 "$policy"
    created_policy=1
fi
cleanup() { if [ "$created_policy" -eq 1 ]; then "${SUDO[@]}" rm -f "$policy"; fi; }
trap cleanup EXIT

say "apt-get update"
"${SUDO[@]}" apt-get update -qq
say "apt-get install -y --no-install-recommends prometheus"
"${SUDO[@]}" apt-get install -y -qq --no-install-recommends prometheus >/dev/null

if command -v prometheus >/dev/null 2>&1 && command -v promtool >/dev/null 2>&1; then
    say "installed: $(prometheus --version 2>&1 | head -n1)"
else
    say "apt-get finished but prometheus/promtool are not on PATH"
    exit 1
fi
