#!/bin/bash
# Start (idempotently) a single-node Slurm cluster on this machine, as root, without systemd.
#
#   bash ci/slurm.sh          install if needed, start munged/mariadbd/slurmdbd/slurmctld/slurmd,
#                             wait for the node
#   bash ci/slurm.sh stop     stop the daemons started here (by PID file)
#   bash ci/slurm.sh stop-controller    stop only slurmctld (by PID file): slurmd, munged,
#                             slurmdbd and the running jobs stay; clients then fail with
#                             "Unable to contact slurm controller"
#   bash ci/slurm.sh start-controller   start slurmctld again (after stop-controller) and
#                             wait until squeue answers; it reloads its saved state
#                             (StateSaveLocation), so it knows the jobs it had
#
# Both controller commands are idempotent: stopping a stopped controller, or starting a
# running one, does nothing and succeeds. They are the engine fault of
# tests/test_cluster_outages.py (a scheduler restart, with jobs running meanwhile).
# While the controller is held down (stop-controller leaves <root>/run/slurmctld.held
# naming its caller, $BATCHPOOL_CONTROLLER_HOLDER or the parent process, and
# start-controller removes it), a plain `bash ci/slurm.sh` from another test session
# waits (up to 15 min, or until that process is gone) instead of cutting the outage short.
#
# Everything lives under $BATCHPOOL_SLURM_ROOT (default /var/lib/batchpool-slurm). The last
# line printed is `export SLURM_CONF=<root>/slurm.conf`; the path is also in <root>/slurm_conf_path.
# Accounting (slurmdbd on MariaDB, so `sacct` works, as on most clusters) is on unless
# BATCHPOOL_SLURM_ACCOUNTING=0.
set -euo pipefail

ROOT="${BATCHPOOL_SLURM_ROOT:-/var/lib/batchpool-slurm}"
CONF="$ROOT/slurm.conf"
export SLURM_CONF="$CONF"
ACCOUNTING="${BATCHPOOL_SLURM_ACCOUNTING:-1}"
MYSQL_SOCKET=/run/mysqld/mysqld.sock  # where the MariaDB client library (slurmdbd) looks

say() { echo "ci/slurm.sh: $*" >&2; }

alive() {  # alive PIDFILE: the process named in the PID file runs
    [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null
}

stop_one() {  # stop_one PIDFILE
    local pidfile=$1 pid
    if alive "$pidfile"; then
        pid=$(cat "$pidfile")
        kill "$pid" 2>/dev/null || true
        for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -9 "$pid" 2>/dev/null || true
    fi
    rm -f "$pidfile"
}

if [ "${1:-}" = "stop" ]; then
    stop_one "$ROOT/run/slurmd.pid"
    stop_one "$ROOT/run/slurmctld.pid"
    stop_one "$ROOT/run/slurmdbd.pid"
    stop_one "$ROOT/mysqld/mariadb.pid"
    stop_one "$ROOT/munge/munged.pid"
    say "stopped"
    exit 0
fi

HELD="$ROOT/run/slurmctld.held"  # the PID of whoever holds slurmctld down (stop-controller)

held_by() {  # print the live process that holds slurmctld down, if any
    local pid
    [ -s "$HELD" ] && pid=$(cat "$HELD") && kill -0 "$pid" 2>/dev/null && echo "$pid"
}

running() {  # running PIDFILE: like alive, but a zombie (PID 1 here may not reap it) is gone
    local state
    [ -s "$1" ] && state=$(ps -o stat= -p "$(cat "$1")" 2>/dev/null) && [ "${state:0:1}" != Z ]
}

stop_controller() {  # SIGTERM (slurmctld saves its state), then SIGKILL after 10 s
    local pidfile="$ROOT/run/slurmctld.pid" pid
    pid=$(cat "$pidfile")
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 100); do running "$pidfile" || break; sleep 0.1; done
    if running "$pidfile"; then
        say "slurmctld (pid $pid) ignored SIGTERM for 10 s: SIGKILL"
        kill -9 "$pid" 2>/dev/null || true
        for _ in $(seq 50); do running "$pidfile" || break; sleep 0.1; done
    fi
    rm -f "$pidfile"
}

if [ "${1:-}" = "stop-controller" ]; then
    mkdir -p "$ROOT/run"
    echo "${BATCHPOOL_CONTROLLER_HOLDER:-$PPID}" >"$HELD"  # before the stop: no one restarts it
    if running "$ROOT/run/slurmctld.pid"; then
        stop_controller
        say "slurmctld stopped (slurmd and the jobs it runs are left alone)"
    else
        rm -f "$ROOT/run/slurmctld.pid"
        say "slurmctld was not running"
    fi
    exit 0
fi

if [ "${1:-}" = "start-controller" ]; then
    if [ ! -s "$CONF" ]; then
        rm -f "$HELD"
        say "no $CONF: run \`bash ci/slurm.sh\` first (start-controller only restarts slurmctld)"
        exit 1
    fi
    if running "$ROOT/run/slurmctld.pid"; then
        say "slurmctld already running (pid $(cat "$ROOT/run/slurmctld.pid"))"
    else
        rm -f "$ROOT/run/slurmctld.pid"
        slurmctld -f "$CONF"
    fi
    # A squeue sent before slurmctld listens takes ~9 s to fail: count time, not tries.
    deadline=$((SECONDS + 60))
    while [ "$SECONDS" -lt "$deadline" ]; do
        if squeue --noheader >/dev/null 2>&1; then
            rm -f "$HELD"
            say "slurmctld answers (SLURM_CONF=$CONF)"
            echo "export SLURM_CONF=$CONF"
            exit 0
        fi
        sleep 0.1
    done
    rm -f "$HELD"
    say "slurmctld did not answer squeue within 60 s; its log says:"
    tail -n 20 "$ROOT/log/slurmctld.log" >&2 || true
    exit 1
fi

if [ "$(id -u)" != 0 ]; then
    say "must run as root (it installs packages and starts daemons)"
    exit 1
fi

# A test holds slurmctld down on purpose (stop-controller): starting it now would end
# that outage early. Wait until the holder starts it again, or is gone.
waited=0
while holder=$(held_by); do
    if [ "$waited" -ge 900 ]; then
        say "slurmctld still held down by process $holder after 900 s: starting it anyway"
        break
    fi
    [ "$waited" -gt 0 ] || say "slurmctld is held down by process $holder (stop-controller): waiting"
    sleep 1
    waited=$((waited + 1))
done

node_idle() {  # the node answers and can run jobs: "idle", not "idle*" (not responding)
    sinfo --noheader --format='%t' 2>/dev/null | grep -Eq '^(idle|mix|alloc)$'
}

# Fast path: everything runs already.
accounting_up() {
    [ "$ACCOUNTING" = 0 ] || { alive "$ROOT/mysqld/mariadb.pid" && alive "$ROOT/run/slurmdbd.pid"; }
}
if alive "$ROOT/munge/munged.pid" && alive "$ROOT/run/slurmctld.pid" \
    && alive "$ROOT/run/slurmd.pid" && accounting_up && node_idle; then
    say "already running"
    echo "export SLURM_CONF=$CONF"
    exit 0
fi

# -- install ---------------------------------------------------------------------------------
if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null \
    || ! command -v sbatch >/dev/null \
    || { [ "$ACCOUNTING" != 0 ] && { ! command -v slurmdbd >/dev/null \
        || ! command -v mariadbd >/dev/null; }; }; then
    if ! command -v apt-get >/dev/null; then
        say "apt-get not available: cannot install slurm-wlm and munge"
        exit 3
    fi
    export DEBIAN_FRONTEND=noninteractive
    # Other scripts may be installing at the same time: wait for dpkg's lock.
    APT=(apt-get -o DPkg::Lock::Timeout=300 -y -q)
    PACKAGES=(slurm-wlm munge)
    [ "$ACCOUNTING" = 0 ] || PACKAGES+=(slurmdbd mariadb-server)
    if ! "${APT[@]}" install "${PACKAGES[@]}" >/dev/null 2>&1; then
        "${APT[@]}" update >/dev/null
        "${APT[@]}" install "${PACKAGES[@]}" >/dev/null
    fi
fi

HOST=$(hostname)
mkdir -p "$ROOT"/{run,log,state,spool,munge}
chmod 0755 "$ROOT"
chown root:root "$ROOT/run"

# -- munge -----------------------------------------------------------------------------------
MUNGE_DIR="$ROOT/munge"
chown munge:munge "$MUNGE_DIR"
chmod 0711 "$MUNGE_DIR"
if [ ! -s "$MUNGE_DIR/munge.key" ]; then
    dd if=/dev/urandom bs=1024 count=1 of="$MUNGE_DIR/munge.key" status=none
fi
chown munge:munge "$MUNGE_DIR/munge.key"
chmod 0400 "$MUNGE_DIR/munge.key"
SOCKET="$MUNGE_DIR/munge.socket"
if ! alive "$ROOT/munge/munged.pid"; then
    rm -f "$SOCKET" "$SOCKET.lock" "$ROOT/munge/munged.pid"
    # munged runs as user munge: its socket, PID file, log and seed live in its own folder.
    runuser -u munge -- munged --key-file="$MUNGE_DIR/munge.key" --socket="$SOCKET" \
        --pid-file="$ROOT/munge/munged.pid" --log-file="$ROOT/munge/munged.log" \
        --seed-file="$MUNGE_DIR/munged.seed" --force
    for _ in $(seq 50); do [ -S "$SOCKET" ] && break; sleep 0.1; done
fi

# -- accounting: MariaDB and slurmdbd ----------------------------------------------------------
ACCOUNTING_CONF=""
if [ "$ACCOUNTING" != 0 ]; then
    DB="$ROOT/mysql"
    mkdir -p "$ROOT/mysqld" /run/mysqld
    chown mysql:mysql "$ROOT/mysqld" /run/mysqld
    if [ ! -d "$DB/mysql" ]; then
        mariadb-install-db --user=mysql --datadir="$DB" --auth-root-authentication-method=socket \
            >"$ROOT/mysqld/install.log" 2>&1 || { cat "$ROOT/mysqld/install.log" >&2; exit 1; }
    fi
    if ! alive "$ROOT/mysqld/mariadb.pid"; then
        rm -f "$ROOT/mysqld/mariadb.pid"
        # Root connects through the socket (unix_socket authentication): no password.
        mariadbd --user=mysql --datadir="$DB" --socket="$MYSQL_SOCKET" --skip-networking \
            --pid-file="$ROOT/mysqld/mariadb.pid" --log-error="$ROOT/mysqld/mariadb.log" \
            >/dev/null 2>&1 &
        for _ in $(seq 100); do mariadb -e 'select 1' >/dev/null 2>&1 && break; sleep 0.1; done
        if ! mariadb -e 'select 1' >/dev/null 2>&1; then
            say "MariaDB did not start; its log says:"
            tail -n 20 "$ROOT/mysqld/mariadb.log" >&2 || true
            exit 1
        fi
    fi
    # slurmdbd reads slurmdbd.conf from the folder of $SLURM_CONF; it must be mode 0600.
    cat >"$ROOT/slurmdbd.conf" <<DBD
AuthType=auth/munge
AuthInfo=socket=$SOCKET
DbdHost=$HOST
DbdAddr=127.0.0.1
SlurmUser=root
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageUser=root
StorageLoc=slurm_acct_db
PidFile=$ROOT/run/slurmdbd.pid
LogFile=$ROOT/log/slurmdbd.log
DBD
    chmod 0600 "$ROOT/slurmdbd.conf"
    ACCOUNTING_CONF="AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=$HOST
AccountingStoragePass=$SOCKET"
fi

# -- slurm.conf ------------------------------------------------------------------------------
MEM=$(slurmd -C 2>/dev/null | tr ' ' '\n' | sed -n 's/^RealMemory=//p' | head -1)
MEM=${MEM:-1000}
COMM=""
if getent ahostsv4 "$HOST" | awk '{print $1}' | grep -q '^127\.'; then
    COMM="CommunicationParameters=NoCtldInAddrAny,NoInAddrAny"
fi
cat >"$CONF.new" <<CONF
ClusterName=batchpool
SlurmctldHost=$HOST(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$SOCKET
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SlurmdParameters=config_overrides
SchedulerParameters=sched_min_interval=0,bf_interval=1
ReturnToService=2
MinJobAge=600
# A job past its --time gets SIGTERM, then SIGKILL after KillWait seconds (default 30).
KillWait=5
MaxArraySize=1001
StateSaveLocation=$ROOT/state
SlurmdSpoolDir=$ROOT/spool
SlurmctldPidFile=$ROOT/run/slurmctld.pid
SlurmdPidFile=$ROOT/run/slurmd.pid
SlurmctldLogFile=$ROOT/log/slurmctld.log
SlurmdLogFile=$ROOT/log/slurmd.log
$COMM
$ACCOUNTING_CONF
NodeName=$HOST NodeAddr=127.0.0.1 CPUs=16 RealMemory=$MEM State=UNKNOWN
PartitionName=debug Nodes=$HOST Default=YES MaxTime=INFINITE State=UP
CONF
mv "$CONF.new" "$CONF"
echo "$CONF" >"$ROOT/slurm_conf_path"

# -- daemons ---------------------------------------------------------------------------------
if [ "$ACCOUNTING" != 0 ] && ! alive "$ROOT/run/slurmdbd.pid"; then
    rm -f "$ROOT/run/slurmdbd.pid"
    slurmdbd
    for _ in $(seq 100); do sacctmgr -n list cluster >/dev/null 2>&1 && break; sleep 0.1; done
    # The cluster must exist in the database before slurmctld reports to it.
    if ! sacctmgr -n -P list cluster format=cluster | grep -qx batchpool; then
        sacctmgr -i add cluster batchpool >/dev/null
    fi
fi
if ! alive "$ROOT/run/slurmctld.pid"; then
    rm -f "$ROOT/run/slurmctld.pid"
    slurmctld -f "$CONF"
fi
if ! alive "$ROOT/run/slurmd.pid"; then
    rm -f "$ROOT/run/slurmd.pid"
    slurmd -f "$CONF"
fi

# -- wait for the node -----------------------------------------------------------------------
for _ in $(seq 120); do
    if node_idle; then
        say "node $HOST is up (SLURM_CONF=$CONF)"
        echo "export SLURM_CONF=$CONF"
        exit 0
    fi
    state=$(sinfo --noheader --format='%t' 2>/dev/null || true)
    case "$state" in down*|drain*) scontrol update nodename="$HOST" state=resume 2>/dev/null || true;; esac
    sleep 0.5
done
say "the node did not become idle within 60 s; sinfo says:"
sinfo >&2 || true
tail -n 20 "$ROOT/log/slurmctld.log" "$ROOT/log/slurmd.log" "$ROOT/munge/munged.log" \
    "$ROOT/log/slurmdbd.log" >&2 2>/dev/null || true
exit 1
