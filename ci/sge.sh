#!/usr/bin/env bash
# Install, configure and start a single-node Son of Grid Engine (8.1.9, Debian packages).
#
#   bash ci/sge.sh          install if needed, configure, start the daemons, wait until jobs run
#   bash ci/sge.sh stop     stop the daemons (by their PID files)
#   bash ci/sge.sh stop-controller    stop only sge_qmaster (by its PID file): sge_execd
#                           and the jobs it runs stay; clients then fail at once with
#                           "unable to send message to qmaster using port 6444"
#   bash ci/sge.sh start-controller   start sge_qmaster again and wait until qstat answers;
#                           it reloads its spool, so it knows the jobs it had
#
# Both controller commands are idempotent (a stopped qmaster stays stopped, a running one
# is left as it is). They are the engine fault of tests/test_cluster_outages.py. While
# qmaster is held down (stop-controller leaves /var/run/gridengine/qmaster.held naming its
# caller, $BATCHPOOL_CONTROLLER_HOLDER or the parent process; start-controller removes
# it), a plain `bash ci/sge.sh` from another test session waits (up to 15 min, or until
# that process is gone) instead of cutting the outage short.
#
# Runs as root, without systemd, and is idempotent: a second run finds the packages
# installed and the daemons answering, re-applies the (same) settings and checks again.
# The environment a client needs is printed and written to $BATCHPOOL_SGE_ENV
# (default /tmp/batchpool-sge.env), a file of `export NAME=value` lines the tests read.
# Facts behind each step: ../shared/notes/engines.md, "Son of Grid Engine".
set -euo pipefail

export SGE_ROOT=/var/lib/gridengine
export SGE_CELL=default
ENV_FILE=${BATCHPOOL_SGE_ENV:-/tmp/batchpool-sge.env}
RUN_DIR=/var/run/gridengine
MASTER_PID=/var/spool/gridengine/qmaster/qmaster.pid # qmaster_spool_dir of bootstrap
EXECD_PID=$RUN_DIR/execd.pid
HOST=$(hostname)
WAIT_SECONDS=${SGE_WAIT_SECONDS:-90}

log() { echo "sge.sh: $*" >&2; }
die() {
    log "ERROR: $*"
    for f in /var/spool/gridengine/qmaster/messages "/var/spool/gridengine/execd/$HOST/messages" \
        /tmp/qmaster_messages /tmp/execd_messages; do
        if [ -f "$f" ]; then
            log "last lines of $f:"
            tail -n 20 "$f" >&2
        fi
    done
    exit 1
}

running() { # running PIDFILE: the daemon in PIDFILE is alive
    [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null
}

stop_daemon() { # stop_daemon PIDFILE NAME
    if running "$1"; then
        local pid
        pid=$(cat "$1")
        log "stopping $2 (pid $pid)"
        kill "$pid" 2>/dev/null || true
        for _ in $(seq 1 100); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
        kill -9 "$pid" 2>/dev/null || true
    fi
    rm -f "$1"
}

if [ "${1:-start}" = stop ]; then
    stop_daemon "$EXECD_PID" sge_execd
    stop_daemon "$MASTER_PID" sge_qmaster
    exit 0
fi
HELD=$RUN_DIR/qmaster.held # the PID of whoever holds sge_qmaster down (stop-controller)

held_by() { # print the live process that holds sge_qmaster down, if any
    local pid
    [ -s "$HELD" ] && pid=$(cat "$HELD") && kill -0 "$pid" 2>/dev/null && echo "$pid"
}

live() { # live PIDFILE: like running, but a zombie (PID 1 here may not reap it) is gone
    local state
    [ -s "$1" ] && state=$(ps -o stat= -p "$(cat "$1")" 2>/dev/null) && [ "${state:0:1}" != Z ]
}

stop_qmaster() { # SIGTERM, then SIGKILL after 30 s (a controlled shutdown takes ~9 s here)
    local pid
    pid=$(cat "$MASTER_PID")
    log "stopping sge_qmaster (pid $pid)"
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 1 300); do
        live "$MASTER_PID" || break
        sleep 0.1
    done
    if live "$MASTER_PID"; then
        log "sge_qmaster (pid $pid) ignored SIGTERM for 30 s: SIGKILL"
        kill -9 "$pid" 2>/dev/null || true
        for _ in $(seq 1 50); do
            live "$MASTER_PID" || break
            sleep 0.1
        done
    fi
    rm -f "$MASTER_PID"
}

if [ "${1:-}" = stop-controller ]; then
    mkdir -p "$RUN_DIR"
    echo "${BATCHPOOL_CONTROLLER_HOLDER:-$PPID}" >"$HELD" # before the stop: no one restarts it
    if live "$MASTER_PID"; then
        stop_qmaster
    else
        rm -f "$MASTER_PID"
        log "sge_qmaster was not running"
    fi
    exit 0
fi
if [ "${1:-}" = start-controller ]; then
    trap 'rm -f "$HELD"' EXIT # held no more, whether qmaster comes back or not
    [ -f "$SGE_ROOT/$SGE_CELL/common/bootstrap" ] || die "SGE is not set up: run \`bash ci/sge.sh\` first"
    if live "$MASTER_PID"; then
        log "sge_qmaster already running (pid $(cat "$MASTER_PID"))"
    else
        rm -f "$MASTER_PID"
        log "starting sge_qmaster"
        /usr/sbin/sge_qmaster || die "sge_qmaster did not start"
    fi
    # Bounded by time: qstat fails at once (connection refused) until qmaster listens.
    deadline=$((SECONDS + 60))
    until qstat >/dev/null 2>&1; do
        [ $SECONDS -lt $deadline ] || die "sge_qmaster did not answer qstat within 60 s"
        sleep 0.2
    done
    log "sge_qmaster answers"
    exit 0
fi
if [ "$(id -u)" != 0 ]; then
    die "run me as root (I install packages and start the SGE daemons)"
fi

# A test holds qmaster down on purpose (stop-controller): starting it now would end that
# outage early. Wait until the holder starts it again, or is gone.
waited=0
while holder=$(held_by); do
    if [ "$waited" -ge 900 ]; then
        log "sge_qmaster still held down by process $holder after 900 s: starting it anyway"
        break
    fi
    [ "$waited" -gt 0 ] || log "sge_qmaster is held down by process $holder (stop-controller): waiting"
    sleep 1
    waited=$((waited + 1))
done

# -- install --------------------------------------------------------------------------------
if ! command -v qsub >/dev/null || [ ! -x /usr/sbin/sge_qmaster ] || [ ! -x /usr/sbin/sge_execd ]; then
    log "installing gridengine-master gridengine-exec gridengine-client"
    for pkg in gridengine-common gridengine-client gridengine-master; do
        cat <<EOF | debconf-set-selections
$pkg shared/gridengineconfig boolean true
$pkg shared/gridenginecell string default
$pkg shared/gridenginemaster string $HOST
EOF
    done
    export DEBIAN_FRONTEND=noninteractive
    if ! apt-get install -y -q gridengine-master gridengine-exec gridengine-client >/tmp/sge-apt.log 2>&1; then
        apt-get update -q >/dev/null 2>&1 || true
        apt-get install -y -q gridengine-master gridengine-exec gridengine-client >/tmp/sge-apt.log 2>&1 \
            || { tail -n 30 /tmp/sge-apt.log >&2; die "apt-get install failed"; }
    fi
fi
[ -f "$SGE_ROOT/$SGE_CELL/common/bootstrap" ] \
    || die "$SGE_ROOT/$SGE_CELL/common/bootstrap is missing: the cluster was not initialised (debconf shared/gridengineconfig must be true); try: apt-get purge gridengine-common and run me again"

# -- hostname resolution: the client reaches qmaster from 127.0.0.1 -------------------------
aliases=$SGE_ROOT/$SGE_CELL/common/host_aliases
if ! grep -qx "$HOST localhost" "$aliases" 2>/dev/null; then
    echo "$HOST localhost" >>"$aliases"
    chown sgeadmin:sgeadmin "$aliases"
fi
echo "$HOST" >"$SGE_ROOT/$SGE_CELL/common/act_qmaster"
chown sgeadmin:sgeadmin "$SGE_ROOT/$SGE_CELL/common/act_qmaster"

mkdir -p -m 0755 "$RUN_DIR"
chown sgeadmin:sgeadmin "$RUN_DIR"

wait_for() { # wait_for SECONDS WHAT COMMAND...
    local seconds=$1 what=$2
    shift 2
    local deadline=$((SECONDS + seconds))
    until "$@" >/dev/null 2>&1; do
        [ $SECONDS -lt $deadline ] || die "timed out after ${seconds}s waiting for $what"
        sleep 0.5
    done
}

# -- qmaster --------------------------------------------------------------------------------
if running "$MASTER_PID" || qstat >/dev/null 2>&1; then
    log "sge_qmaster already running (pid $(cat "$MASTER_PID" 2>/dev/null || echo ?))"
    wait_for 30 "sge_qmaster to answer (qstat)" qstat
else
    rm -f "$MASTER_PID"
    log "starting sge_qmaster"
    /usr/sbin/sge_qmaster || die "sge_qmaster did not start"
    wait_for 30 "sge_qmaster to answer (qstat)" qstat
fi

# -- configuration (re-applied every time: each step sets, never toggles) -------------------
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

# Root runs the jobs here: min_uid/min_gid 0. The file must be named `global`.
# The accounting file is flushed every second (default 15 s), so qacct knows a job soon after.
qconf -sconf global >"$tmp/global"
sed -i -E 's/^min_uid .*/min_uid                      0/; s/^min_gid .*/min_gid                      0/; s/flush_time=[0-9:]+/flush_time=00:00:01/' "$tmp/global"
qconf -Mconf "$tmp/global" >/dev/null 2>&1 || die "qconf -Mconf global failed"

qconf -sh 2>/dev/null | grep -qx "$HOST" || qconf -ah "$HOST" >/dev/null
qconf -ss 2>/dev/null | grep -qx "$HOST" || qconf -as "$HOST" >/dev/null
if ! qconf -sel 2>/dev/null | grep -qx "$HOST"; then
    printf 'hostname %s\nload_scaling NONE\ncomplex_values NONE\nuser_lists NONE\nxuser_lists NONE\nprojects NONE\nxprojects NONE\nusage_scaling NONE\nreport_variables NONE\n' \
        "$HOST" >"$tmp/exechost"
    qconf -Ae "$tmp/exechost" >/dev/null || die "qconf -Ae $HOST failed"
fi

printf 'group_name @allhosts\nhostlist %s\n' "$HOST" >"$tmp/allhosts"
if qconf -shgrpl 2>/dev/null | grep -qx "@allhosts"; then
    qconf -Mhgrp "$tmp/allhosts" >/dev/null || die "qconf -Mhgrp @allhosts failed"
else
    qconf -Ahgrp "$tmp/allhosts" >/dev/null || die "qconf -Ahgrp @allhosts failed"
fi

set_field() { # set_field FILE NAME VALUE
    if grep -qE "^$2[[:space:]]" "$1"; then
        sed -i -E "s|^$2[[:space:]].*|$2 $3|" "$1"
    else
        echo "$2 $3" >>"$1"
    fi
}

if qconf -sql 2>/dev/null | grep -qx all.q; then
    qconf -sq all.q >"$tmp/all.q"
    verb=-Mq
else
    qconf -sq >"$tmp/all.q" # the template
    verb=-Aq
fi
set_field "$tmp/all.q" qname all.q
set_field "$tmp/all.q" hostlist @allhosts
set_field "$tmp/all.q" pe_list NONE
set_field "$tmp/all.q" load_thresholds NONE
set_field "$tmp/all.q" slots 16
set_field "$tmp/all.q" shell /bin/bash
set_field "$tmp/all.q" shell_start_mode unix_behavior
qconf $verb "$tmp/all.q" >/dev/null || die "qconf $verb all.q failed"

qconf -ssconf >"$tmp/sched"
set_field "$tmp/sched" schedule_interval 0:0:1
set_field "$tmp/sched" flush_submit_sec 1
set_field "$tmp/sched" flush_finish_sec 1
qconf -Msconf "$tmp/sched" >/dev/null 2>&1 || die "qconf -Msconf failed"

# -- execd ----------------------------------------------------------------------------------
if running "$EXECD_PID"; then
    log "sge_execd already running (pid $(cat "$EXECD_PID"))"
else
    rm -f "$EXECD_PID"
    log "starting sge_execd"
    SGE_EXECD_PIDFILE=$EXECD_PID /usr/sbin/sge_execd || die "sge_execd did not start"
fi

# -- ready: the queue instance is up, and a trivial job runs to its end ---------------------
queue_ready() { # all.q@HOST listed without an alarm/unknown/disabled state
    qstat -f -q all.q 2>/dev/null | awk -v q="all.q@$HOST" '$1 == q { found = 1; if (NF >= 6) bad = 1 } END { exit !(found && !bad) }'
}
wait_for "$WAIT_SECONDS" "queue all.q@$HOST to be ready (qstat -f)" queue_ready

job=$(echo 'exit 0' | qsub -terse -N batchpool-sge-check -o /dev/null -e /dev/null -cwd 2>&1) \
    || die "a trivial qsub failed: $job"
job=${job%%.*}
job_done() { ! qstat -j "$job" >/dev/null 2>&1; }
wait_for "$WAIT_SECONDS" "the trivial job $job to run" job_done

# -- the client's environment ---------------------------------------------------------------
cat >"$ENV_FILE" <<EOF
export SGE_ROOT=$SGE_ROOT
export SGE_CELL=$SGE_CELL
export PATH=/usr/bin:\$PATH
EOF
log "SGE is ready on $HOST; environment (written to $ENV_FILE):"
cat "$ENV_FILE"
