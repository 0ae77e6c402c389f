#!/usr/bin/env bash
# Install, non-interactively, the Debian packages the test suite needs.
# Idempotent: safe to run repeatedly. Tests start their own postgres/nginx,
# so any system services the packages bring up are stopped and disabled.
set -euo pipefail

export DEBIAN_FRONTEND=noninteractive

PACKAGES=(
  btrfs-progs
  postgresql
  util-linux
  procps
  curl
  wrk
  nginx
  postfix
  swaks
  sqlite3
  chromium
  dovecot-imapd   # the IMAP tests' backend (imaptest is not packaged in Debian 12: aioimaplib is the load client)
)

SUDO=""
if [[ "$(id -u)" -ne 0 ]]; then
  SUDO="sudo"
fi

$SUDO apt-get update
# Postfix asks how to configure itself; the tests run their own private instance (tests/mail.py).
echo "postfix postfix/main_mailer_type select Local only" | $SUDO debconf-set-selections
$SUDO apt-get install -y \
  -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold \
  "${PACKAGES[@]}"

# Leave no system postgresql/nginx running: tests start their own.
stop_service() {
  local svc="$1"
  if command -v systemctl >/dev/null 2>&1; then
    $SUDO systemctl disable --now "$svc" >/dev/null 2>&1 || true
  fi
  if command -v service >/dev/null 2>&1; then
    $SUDO service "$svc" stop >/dev/null 2>&1 || true
  fi
}
stop_service postgresql
stop_service nginx
stop_service postfix
stop_service dovecot

# Without a working init the packages' own start attempts may still leave
# daemons behind; stop Debian clusters explicitly and give nginx a quit.
if command -v pg_lsclusters >/dev/null 2>&1; then
  while read -r ver name _; do
    $SUDO pg_ctlcluster "$ver" "$name" stop >/dev/null 2>&1 || true
  done < <(pg_lsclusters --no-header 2>/dev/null || true)
fi
if [[ -f /run/nginx.pid ]]; then
  $SUDO nginx -s quit >/dev/null 2>&1 || true
fi

echo "install-deps: ok"
