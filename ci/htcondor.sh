#!/usr/bin/env bash
# A single-node HTCondor pool for the tests: Debian 13's minicondor in a container on the
# host network (Debian 12, this host, has no HTCondor package; the PyPI wheel holds only
# the Python bindings). The container engine is the one ci/docker.sh starts.
#
#   bash ci/htcondor.sh          build the image if missing, start the pool if not running,
#                                write the client's environment; idempotent
#   bash ci/htcondor.sh stop     stop the pool this script started (its container)
#   bash ci/htcondor.sh stop-controller    stop only the schedd (condor_off -daemon schedd):
#                                the startd and the jobs it runs carry on
#   bash ci/htcondor.sh start-controller   start the schedd again and wait until it answers
#
# Jobs never run as root under HTCondor, so the pool has a job user (uid $JOB_UID) and the
# host's client submits as that user, authenticated by an IDTOKENS token. The container
# sees the host's /tmp (stores and logs live there), and this Python's prefix and the
# batchpool checkout read-only at the same paths, as a shared filesystem would: jobs run
# the client's own interpreter.
#
# The environment a client needs is written to $BATCHPOOL_HTCONDOR_ENV (default
# /tmp/batchpool-htcondor.env) as `export NAME=value` lines:
#   CONDOR_CONFIG               a client configuration naming the pool and the token
#   BATCHPOOL_HTCONDOR_USER     the user jobs run as
#   BATCHPOOL_HTCONDOR_SHARED   a folder under /tmp that the job user may write (stores)
#   BATCHPOOL_HTCONDOR_EXEC     `docker exec` argv prefix that runs a command in the pool
#   DOCKER_HOST                 the socket of the daemon that runs the pool's container
# Facts behind each step: ../shared/notes/engines.md, "HTCondor".
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(cd "$HERE/.." && pwd)
ROOT=${BATCHPOOL_HTCONDOR_ROOT:-/var/lib/batchpool-htcondor}
ENV_FILE=${BATCHPOOL_HTCONDOR_ENV:-/tmp/batchpool-htcondor.env}
IMAGE=${BATCHPOOL_HTCONDOR_IMAGE:-localhost/batchpool-minicondor:trixie}
CONTAINER=batchpool-htcondor
JOB_USER=bpjob
JOB_UID=1777
SHARED=/tmp/batchpool-htcondor-shared
PYTHON=${PYTHON:-python3}

log() { echo "htcondor.sh: $*" >&2; }
die() {
    log "ERROR: $*"
    exit 1
}

# The container engine (ci/docker.sh is idempotent and prints nothing we need here).
mkdir -p "$ROOT"
bash "$HERE/docker.sh" >/dev/null 2>"$ROOT/docker.log" || { cat "$ROOT/docker.log" >&2; die "ci/docker.sh failed"; }
# shellcheck disable=SC1090
source "${BATCHPOOL_DOCKER_ENV:-/tmp/batchpool-docker.env}"
DOCKER=$BATCHPOOL_DOCKER
running() { [ "$("$DOCKER" inspect -f '{{.State.Running}}' "$CONTAINER" 2>/dev/null)" = true ]; }

if [ "${1:-start}" = stop ]; then
    if "$DOCKER" inspect "$CONTAINER" >/dev/null 2>&1; then
        log "stopping the pool (container $CONTAINER)"
        "$DOCKER" rm -f "$CONTAINER" >/dev/null
    fi
    exit 0
fi
schedd_answers() { "$DOCKER" exec "$CONTAINER" condor_q -totals >/dev/null 2>&1; }
if [ "${1:-}" = stop-controller ]; then
    running || die "the pool is not running"
    "$DOCKER" exec "$CONTAINER" condor_off -daemon schedd >/dev/null || die "condor_off failed"
    for _ in $(seq 1 150); do
        schedd_answers || exit 0
        sleep 0.2
    done
    die "the schedd still answers 30 s after condor_off"
fi
if [ "${1:-}" = start-controller ]; then
    running || die "the pool is not running"
    "$DOCKER" exec "$CONTAINER" condor_on -daemon schedd >/dev/null || die "condor_on failed"
    for _ in $(seq 1 300); do
        schedd_answers && { log "the schedd answers again"; exit 0; }
        sleep 0.2
    done
    die "the schedd did not answer within 60 s of condor_on"
fi
[ "$(id -u)" = 0 ] || die "run me as root (I start containers)"

# -- the image: trixie minbase, then minicondor and the job user --------------------------
if ! "$DOCKER" image inspect "$IMAGE" >/dev/null 2>&1; then
    mirror=$(bash "$HERE/debian-mirror.sh") || die "no Debian mirror to debootstrap from"
    rootfs=$ROOT/rootfs-trixie
    rm -rf "$rootfs"
    log "debootstrap trixie from $mirror (about 60 s)"
    # minicondor cannot come with --include (python3-cryptography's dependencies break
    # debootstrap's resolver): apt installs it in the build below.
    debootstrap --variant=minbase trixie "$rootfs" "$mirror" >"$ROOT/debootstrap.log" 2>&1 \
        || { tail -n 30 "$ROOT/debootstrap.log" >&2; die "debootstrap trixie failed"; }
    rm -rf "$rootfs/var/cache/apt/archives/"*.deb
    mkdir -p "$rootfs/etc/ssl/certs"
    cp /etc/ssl/certs/ca-certificates.crt "$rootfs/etc/ssl/certs/ca-certificates.crt"
    tar -C "$rootfs" -c . | "$DOCKER" import - "$IMAGE-base" >/dev/null || die "docker import failed"
    rm -rf "$rootfs"
    build=$(mktemp -d)
    cat >"$build/Dockerfile" <<EOF
FROM $IMAGE-base
RUN apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q \
        --no-install-recommends minicondor && rm -rf /var/lib/apt/lists/* \
    && useradd -u $JOB_UID -m $JOB_USER \
    && chmod 755 /root
CMD ["condor_master", "-f"]
EOF
    log "building $IMAGE (about 40 s)"
    "$DOCKER" build --network host -t "$IMAGE" "$build" >"$ROOT/build.log" 2>&1 \
        || { tail -n 30 "$ROOT/build.log" >&2; die "docker build of $IMAGE failed"; }
    rm -rf "$build"
fi

# -- the pool -------------------------------------------------------------------------------
prefix=$("$PYTHON" -c 'import os, sys; print(os.path.realpath(sys.prefix))')
package=$("$PYTHON" -c 'import os, batchpool; print(os.path.dirname(os.path.dirname(os.path.realpath(batchpool.__file__))))')
mkdir -p "$SHARED"
chmod 1777 "$SHARED"
# The pool's own settings, mounted into the container: it listens on the loopback only,
# jobs may use both cores, and the daemons tell each other of changes within seconds
# (a pool's defaults are minutes: a freed core would wait that long for its next job).
cat >"$ROOT/90-batchpool.config" <<'EOF'
NETWORK_INTERFACE = 127.0.0.1
NUM_CPUS = 2
SEC_TOKEN_ISSUER_KEY = POOL
NEGOTIATOR_INTERVAL = 2
NEGOTIATOR_MIN_INTERVAL = 1
NEGOTIATOR_CYCLE_DELAY = 1
UPDATE_INTERVAL = 2
SCHEDD_INTERVAL = 2
STARTER_UPDATE_INTERVAL = 2
SHADOW_QUEUE_UPDATE_INTERVAL = 2
PERIODIC_EXPR_INTERVAL = 2
EOF
if ! running; then
    "$DOCKER" rm -f "$CONTAINER" >/dev/null 2>&1 || true
    log "starting the pool (container $CONTAINER)"
    mounts=(-v /tmp:/tmp -v "$prefix:$prefix:ro"
        -v "$ROOT/90-batchpool.config:/etc/condor/config.d/90-batchpool:ro")
    # The checkout is outside the prefix for an editable install.
    case "$package/" in "$prefix"/*) ;; *) mounts+=(-v "$package:$package:ro") ;; esac
    if [ "$REPO" != "$package" ]; then
        case "$REPO/" in "$prefix"/*) ;; *) mounts+=(-v "$REPO:$REPO:ro") ;; esac
    fi
    "$DOCKER" run -d --name "$CONTAINER" --network host --hostname batchpool-htcondor \
        "${mounts[@]}" "$IMAGE" >/dev/null || die "docker run of $IMAGE failed"
fi
EXEC=("$DOCKER" exec "$CONTAINER")
"${EXEC[@]}" condor_reconfig >/dev/null 2>&1 || true  # a running pool reads the settings again
for _ in $(seq 1 300); do
    "${EXEC[@]}" condor_status -schedd -af Name >/dev/null 2>&1 && break
    sleep 0.2
done
"${EXEC[@]}" condor_status -schedd -af Name >/dev/null 2>&1 || {
    "$DOCKER" logs "$CONTAINER" 2>&1 | tail -n 20 >&2
    die "the pool did not answer condor_status within 60 s"
}

# -- the client's side: a configuration and a token for the job user ----------------------
domain=$("${EXEC[@]}" condor_config_val UID_DOMAIN)
mkdir -p "$ROOT/tokens"
chmod 700 "$ROOT/tokens"
"${EXEC[@]}" condor_token_create -identity "$JOB_USER@$domain" >"$ROOT/tokens/batchpool" \
    || die "condor_token_create failed"
chmod 600 "$ROOT/tokens/batchpool"
cat >"$ROOT/condor_config" <<EOF
COLLECTOR_HOST = 127.0.0.1:9618
SEC_TOKEN_DIRECTORY = $ROOT/tokens
SEC_CLIENT_AUTHENTICATION_METHODS = IDTOKENS
EOF

cat >"$ENV_FILE" <<EOF
export CONDOR_CONFIG=$ROOT/condor_config
export BATCHPOOL_HTCONDOR_USER=$JOB_USER
export BATCHPOOL_HTCONDOR_SHARED=$SHARED
export BATCHPOOL_HTCONDOR_EXEC="$DOCKER exec -u $JOB_USER $CONTAINER"
export DOCKER_HOST=$DOCKER_HOST
EOF
log "the pool is ready; environment (written to $ENV_FILE):"
cat "$ENV_FILE"
