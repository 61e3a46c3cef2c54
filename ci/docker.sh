#!/usr/bin/env bash
# Install Debian's docker.io, start its daemon by hand (no systemd here) on a private
# socket, and build the tests' base image from Debian packages (no registry is reachable).
#
#   bash ci/docker.sh          install if needed, start dockerd if not running, build the
#                              base image if missing; idempotent
#   bash ci/docker.sh stop     stop the dockerd this script started (by its PID file)
#
# The environment a client needs is written to $BATCHPOOL_DOCKER_ENV (default
# /tmp/batchpool-docker.env) as `export NAME=value` lines:
#   DOCKER_HOST            the daemon's socket
#   BATCHPOOL_DOCKER       the docker CLI that matches the daemon (Debian's, not another on PATH)
#   BATCHPOOL_BASE_IMAGE   a Debian bookworm image with python3 and pip, built here
# Facts behind each step: ../shared/notes/engines.md, "Containers".
set -euo pipefail

ROOT=${BATCHPOOL_DOCKER_ROOT:-/var/lib/batchpool-docker}
RUN=/run/batchpool-docker
PIDFILE=$RUN/dockerd.pid
SOCK=$RUN/docker.sock
ENV_FILE=${BATCHPOOL_DOCKER_ENV:-/tmp/batchpool-docker.env}
BASE_IMAGE=${BATCHPOOL_BASE_IMAGE:-localhost/batchpool-base:bookworm}
DOCKER=/usr/bin/docker
LOG=$ROOT/dockerd.log

log() { echo "docker.sh: $*" >&2; }
die() {
    log "ERROR: $*"
    if [ -f "$LOG" ]; then
        log "last lines of $LOG:"
        tail -n 20 "$LOG" >&2
    fi
    exit 1
}
running() { [ -s "$PIDFILE" ] && kill -0 "$(cat "$PIDFILE")" 2>/dev/null; }

stop() {
    if running; then
        local pid
        pid=$(cat "$PIDFILE")
        log "stopping dockerd (pid $pid)"
        kill "$pid" 2>/dev/null || true
        for _ in $(seq 1 150); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
        kill -9 "$pid" 2>/dev/null || true
    fi
    rm -f "$PIDFILE"
    # A dockerd ended by a signal leaves its network namespace's bind mount behind.
    if mountpoint -q "$RUN/exec/netns/default" 2>/dev/null; then
        umount "$RUN/exec/netns/default" || true
    fi
}

if [ "${1:-start}" = stop ]; then
    stop
    exit 0
fi
[ "$(id -u)" = 0 ] || die "run me as root (I install packages and start dockerd)"

# -- install ----------------------------------------------------------------------------
apt_install() {
    export DEBIAN_FRONTEND=noninteractive
    if ! apt-get install -y -q --no-install-recommends "$@" >/tmp/batchpool-docker-apt.log 2>&1; then
        apt-get update -q >/dev/null 2>&1 || true
        apt-get install -y -q --no-install-recommends "$@" >/tmp/batchpool-docker-apt.log 2>&1 \
            || { tail -n 30 /tmp/batchpool-docker-apt.log >&2; die "apt-get install $* failed"; }
    fi
}
if [ ! -x /usr/sbin/dockerd ] || [ ! -x "$DOCKER" ]; then
    log "installing docker.io"
    apt_install docker.io
fi
command -v debootstrap >/dev/null || apt_install debootstrap

# -- the daemon -------------------------------------------------------------------------
mkdir -p "$ROOT" "$RUN"
if running && DOCKER_HOST=unix://$SOCK "$DOCKER" info >/dev/null 2>&1; then
    log "dockerd already running (pid $(cat "$PIDFILE"))"
else
    stop
    log "starting dockerd on $SOCK"
    # No bridge and no iptables: containers use the host's network, and nothing on this
    # machine's firewall or sysctls changes.
    setsid /usr/sbin/dockerd --data-root "$ROOT/data" --exec-root "$RUN/exec" \
        --pidfile "$PIDFILE" -H "unix://$SOCK" --iptables=false --ip-forward=false \
        --ip-masq=false --bridge=none >"$LOG" 2>&1 </dev/null &
    for _ in $(seq 1 300); do
        DOCKER_HOST=unix://$SOCK "$DOCKER" info >/dev/null 2>&1 && break
        sleep 0.1
    done
    DOCKER_HOST=unix://$SOCK "$DOCKER" info >/dev/null 2>&1 || die "dockerd did not answer on $SOCK"
fi
export DOCKER_HOST=unix://$SOCK

# -- the base image: Debian bookworm with python3 and pip, from the mirror apt uses ---------
if ! "$DOCKER" image inspect "$BASE_IMAGE" >/dev/null 2>&1; then
    mirror=$(bash "$(dirname "$0")/debian-mirror.sh") || die "no Debian mirror to debootstrap from"
    rootfs=$ROOT/rootfs-bookworm
    rm -rf "$rootfs"
    log "building $BASE_IMAGE with debootstrap from $mirror (about 90 s)"
    debootstrap --variant=minbase --include=python3,python3-pip,python3-venv bookworm "$rootfs" "$mirror" \
        >"$ROOT/debootstrap.log" 2>&1 || { tail -n 30 "$ROOT/debootstrap.log" >&2; die "debootstrap failed"; }
    rm -rf "$rootfs/var/cache/apt/archives/"*.deb "$rootfs/var/lib/apt/lists/"*
    # Trust what this host trusts: where HTTPS leaves through a proxy with its own CA
    # (as on these machines), pip inside image builds needs that CA too.
    cp /etc/ssl/certs/ca-certificates.crt "$rootfs/etc/ssl/certs/ca-certificates.crt"
    tar -C "$rootfs" -c . | "$DOCKER" import - "$BASE_IMAGE" >/dev/null || die "docker import failed"
    rm -rf "$rootfs"
fi

cat >"$ENV_FILE" <<EOF
export DOCKER_HOST=unix://$SOCK
export BATCHPOOL_DOCKER=$DOCKER
export BATCHPOOL_BASE_IMAGE=$BASE_IMAGE
EOF
log "dockerd is ready; environment (written to $ENV_FILE):"
cat "$ENV_FILE"
