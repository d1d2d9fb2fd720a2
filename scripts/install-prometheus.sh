#!/usr/bin/env bash
# Install Prometheus and promtool from Debian's `prometheus` package, idempotently.
#
# Why: tests/e2e/test_prometheus_config.py runs `promtool check config|rules` and `promtool test rules`
# on deploy/prometheus/, and the live end-to-end test starts its own `prometheus` on a free port.
# What it must not do: leave Debian's packaged daemon running as a system service (it would hold :9090
# and scrape nothing of ours). Service start during the install is blocked with a temporary
# policy-rc.d (only if none exists), and the service is stopped and disabled afterwards.
#
# Usage: scripts/install-prometheus.sh        (as root, or with sudo available)
set -euo pipefail

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  SUDO="sudo"
fi

if command -v prometheus >/dev/null 2>&1 && command -v promtool >/dev/null 2>&1; then
  echo "install-prometheus: prometheus and promtool already installed"
else
  # Keep the package's postinst from starting the daemon (invoke-rc.d consults policy-rc.d; 101 = "action
  # not allowed"). Only create the file when none exists, and remove only the one we created.
  created_policy=""
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' | $SUDO tee /usr/sbin/policy-rc.d >/dev/null
    $SUDO chmod 755 /usr/sbin/policy-rc.d
    created_policy=1
  fi
  cleanup() {
    if [ -n "$created_policy" ]; then
      $SUDO rm -f /usr/sbin/policy-rc.d
    fi
  }
  trap cleanup EXIT
  $SUDO apt-get update
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y --no-install-recommends prometheus
fi

# Make sure the packaged daemon is not left running or enabled as a service.
if command -v systemctl >/dev/null 2>&1 && [ -d /run/systemd/system ]; then
  $SUDO systemctl disable --now prometheus.service >/dev/null 2>&1 || true
elif [ -x /etc/init.d/prometheus ]; then
  $SUDO /etc/init.d/prometheus stop >/dev/null 2>&1 || true
  if command -v update-rc.d >/dev/null 2>&1; then
    $SUDO update-rc.d prometheus disable >/dev/null 2>&1 || true
  fi
fi
if [ -s /run/prometheus/prometheus.pid ] && kill -0 "$(cat /run/prometheus/prometheus.pid)" 2>/dev/null; then
  echo "install-prometheus: WARNING: a packaged prometheus daemon is still running (pid $(cat /run/prometheus/prometheus.pid))" >&2
fi

prometheus --version 2>&1 | head -1
promtool --version 2>&1 | head -1
