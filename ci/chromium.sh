#!/usr/bin/env bash
# Make sure headless Chromium and its matching chromedriver (Debian's packages chromium and
# chromium-driver, the same version) are installed, for the browser tests (tests/browser.py).
#
#   bash ci/chromium.sh     install if needed, check both binaries start, print the exports
#
# Idempotent: a second run finds both binaries and only checks them. Installing needs root;
# nothing is downloaded but Debian's packages from the mirror apt uses. On stdout come only
# the lines the tests read:
#   export BATCHPOOL_CHROMIUM=/usr/bin/chromium
#   export BATCHPOOL_CHROMEDRIVER=/usr/bin/chromedriver
# Diagnostics go to stderr.
set -euo pipefail

CHROMIUM=/usr/bin/chromium
CHROMEDRIVER=/usr/bin/chromedriver
PACKAGES=(chromium chromium-driver)
APT_LOG=/tmp/chromium-apt.log

log() { echo "chromium.sh: $*" >&2; }
die() {
    log "ERROR: $*"
    exit 1
}

# -- install --------------------------------------------------------------------------------
if [ ! -x "$CHROMIUM" ] || [ ! -x "$CHROMEDRIVER" ]; then
    [ "$(id -u)" -eq 0 ] \
        || die "$CHROMIUM or $CHROMEDRIVER is missing and installing ${PACKAGES[*]} needs root (run: sudo bash ci/chromium.sh)"
    log "installing ${PACKAGES[*]}"
    export DEBIAN_FRONTEND=noninteractive
    install() {
        apt-get -o DPkg::Lock::Timeout=300 -y -q install --no-install-recommends "${PACKAGES[@]}" \
            >"$APT_LOG" 2>&1
    }
    if ! install; then
        log "apt-get install failed: apt-get update, then once more"
        apt-get -o DPkg::Lock::Timeout=300 update -q >>"$APT_LOG" 2>&1 || true
        install || { tail -n 30 "$APT_LOG" >&2; die "apt-get install ${PACKAGES[*]} failed (log: $APT_LOG)"; }
    fi
fi
[ -x "$CHROMIUM" ] || die "$CHROMIUM is missing after installing ${PACKAGES[*]}"
[ -x "$CHROMEDRIVER" ] || die "$CHROMEDRIVER is missing after installing ${PACKAGES[*]}"

# -- check: both start, and are the same version --------------------------------------------
browser_version=$("$CHROMIUM" --version 2>/dev/null) || die "$CHROMIUM --version failed"
driver_version=$("$CHROMEDRIVER" --version 2>/dev/null) || die "$CHROMEDRIVER --version failed"
log "$browser_version; $driver_version"
browser_major=$(grep -o '[0-9][0-9]*\.' <<<"$browser_version" | head -n 1)
driver_major=$(grep -o '[0-9][0-9]*\.' <<<"$driver_version" | head -n 1)
[ "$browser_major" = "$driver_major" ] \
    || die "chromium ($browser_version) and chromedriver ($driver_version) differ: apt-get install --only-upgrade ${PACKAGES[*]}"

echo "export BATCHPOOL_CHROMIUM=$CHROMIUM"
echo "export BATCHPOOL_CHROMEDRIVER=$CHROMEDRIVER"
