#!/usr/bin/env bash
# Print the Debian mirror apt uses here (for debootstrap), or fail saying where it looked.
# Used by ci/docker.sh and ci/htcondor.sh when they build an image from Debian packages.
set -euo pipefail
mirror=$(sed -n 's/^URIs: *//p' /etc/apt/sources.list.d/*.sources 2>/dev/null | grep -v security | head -n 1 || true)
if [ -z "$mirror" ]; then
    mirror=$(awk '$1 == "deb" { print $2; exit }' /etc/apt/sources.list 2>/dev/null || true)
fi
if [ -z "$mirror" ]; then
    echo "no Debian mirror found in /etc/apt/sources.list.d/*.sources or sources.list" >&2
    exit 1
fi
echo "$mirror"
