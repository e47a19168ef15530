#!/usr/bin/env bash
# A one-node SLURM cluster and a PostgreSQL server on this machine, for trying cnnlab's cluster
# features (and for its tests marked `cluster`):
#
#   bash scripts/local_cluster.sh up       # idempotent; prints what to export and the database URL
#   bash scripts/local_cluster.sh status
#   bash scripts/local_cluster.sh down     # stops everything it started
#   bash scripts/local_cluster.sh createdb NAME      # a fresh, empty database; prints its URL
#   bash scripts/local_cluster.sh pg-restart [SECONDS]  # PostgreSQL down for SECONDS (10), then up again
#
# Every config, state, spool, log and database file lives under one folder,
# $CNNLAB_CLUSTER_DIR (default /tmp/cnnlab-cluster). Needs root and apt-get (Debian's slurm-wlm,
# munge and postgresql are installed when missing). SLURM's client commands find this cluster
# through SLURM_CONF=$CNNLAB_CLUSTER_DIR/slurm/slurm.conf.
set -euo pipefail

DIR=${CNNLAB_CLUSTER_DIR:-/tmp/cnnlab-cluster}
PARTITION=cnnlab
PG_PORT=${CNNLAB_PG_PORT:-55432}
PG_USER=cnnlab
PG_DB=cnnlab
SLURM_DIR=$DIR/slurm
PG_DIR=$DIR/postgres
MUNGE_DIR=$DIR/munge
export SLURM_CONF=$SLURM_DIR/slurm.conf

fail() { echo "local_cluster: $*" >&2; exit 1; }

pg_bin() {
    local found
    found=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)
    [ -n "$found" ] || fail "no PostgreSQL server binaries in /usr/lib/postgresql/*/bin"
    echo "$found"
}

install_packages() {
    local missing=()
    command -v slurmctld >/dev/null || missing+=(slurm-wlm)
    command -v munged >/dev/null || missing+=(munge)
    ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || missing+=(postgresql)
    [ ${#missing[@]} -eq 0 ] && return
    command -v apt-get >/dev/null || fail "needs apt-get to install ${missing[*]} (a Debian or Ubuntu machine)"
    echo "local_cluster: installing ${missing[*]}"
    DEBIAN_FRONTEND=noninteractive apt-get install -y "${missing[@]}" >/dev/null 2>&1 \
        || { apt-get update >/dev/null 2>&1 && DEBIAN_FRONTEND=noninteractive apt-get install -y "${missing[@]}" >/dev/null 2>&1; } \
        || fail "apt-get could not install ${missing[*]}"
}

alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

wait_until() {  # wait_until SECONDS COMMAND...: true once COMMAND succeeds
    local end=$((SECONDS + $1)); shift
    until "$@" >/dev/null 2>&1; do
        [ $SECONDS -lt $end ] || return 1
        sleep 0.2
    done
}

munge_up() {
    mkdir -p "$MUNGE_DIR"
    chown munge: "$MUNGE_DIR"
    if [ ! -f "$MUNGE_DIR/munge.key" ]; then
        dd if=/dev/urandom of="$MUNGE_DIR/munge.key" bs=1024 count=1 status=none
        chown munge: "$MUNGE_DIR/munge.key"
        chmod 400 "$MUNGE_DIR/munge.key"
    fi
    alive "$MUNGE_DIR/munged.pid" && return
    runuser -u munge -- munged --force --key-file="$MUNGE_DIR/munge.key" --socket="$MUNGE_DIR/munge.socket" \
        --pid-file="$MUNGE_DIR/munged.pid" --log-file="$MUNGE_DIR/munged.log" --seed-file="$MUNGE_DIR/munged.seed"
    wait_until 10 test -S "$MUNGE_DIR/munge.socket" || fail "munged did not start; see $MUNGE_DIR/munged.log"
}

slurm_conf() {
    local host cpus mem
    host=$(hostname -s)
    cpus=$(getconf _NPROCESSORS_ONLN)  # not nproc, which follows OMP_NUM_THREADS
    mem=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 - 1024 ))
    mkdir -p "$SLURM_DIR/state" "$SLURM_DIR/spool" "$SLURM_DIR/log"
    cat > "$SLURM_CONF" <<EOF
# Written by cnnlab's scripts/local_cluster.sh: one node, this machine.
ClusterName=cnnlab
SlurmctldHost=$host
SlurmUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$MUNGE_DIR/munge.socket
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
# a job that waits for a free core starts as soon as one is (the defaults look every 30 s and 60 s)
SchedulerParameters=bf_interval=1,sched_interval=1
ReturnToService=2
JobRequeue=1
KillWait=10
MinJobAge=300
StateSaveLocation=$SLURM_DIR/state
SlurmdSpoolDir=$SLURM_DIR/spool
SlurmctldPidFile=$SLURM_DIR/slurmctld.pid
SlurmdPidFile=$SLURM_DIR/slurmd.pid
SlurmctldLogFile=$SLURM_DIR/log/slurmctld.log
SlurmdLogFile=$SLURM_DIR/log/slurmd.log
SlurmctldPort=${CNNLAB_SLURMCTLD_PORT:-16817}
SlurmdPort=${CNNLAB_SLURMD_PORT:-16818}
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
NodeName=$host CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=$PARTITION Nodes=$host Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
EOF
}

slurm_up() {
    slurm_conf
    alive "$SLURM_DIR/slurmctld.pid" || slurmctld -f "$SLURM_CONF"
    wait_until 20 scontrol ping || fail "slurmctld did not start; see $SLURM_DIR/log/slurmctld.log"
    alive "$SLURM_DIR/slurmd.pid" || slurmd -f "$SLURM_CONF"
    wait_until 30 bash -c "sinfo -h -N -o %T | grep -qE '^(idle|mixed|allocated)'" \
        || { scontrol update nodename="$(hostname -s)" state=resume >/dev/null 2>&1 || true; \
             wait_until 10 bash -c "sinfo -h -N -o %T | grep -qE '^(idle|mixed|allocated)'"; } \
        || fail "slurmd did not come up; see $SLURM_DIR/log/slurmd.log"
}

pg_up() {
    local bin
    bin=$(pg_bin)
    mkdir -p "$PG_DIR"
    chown postgres: "$PG_DIR"
    if [ ! -f "$PG_DIR/data/PG_VERSION" ]; then
        # the superuser over this folder's socket only; the cnnlab role logs in over TCP with its password
        runuser -u postgres -- "$bin/initdb" -D "$PG_DIR/data" --auth-local=trust --auth-host=scram-sha-256 \
            -U postgres >/dev/null \
            || fail "initdb failed in $PG_DIR/data"
    fi
    if ! runuser -u postgres -- "$bin/pg_ctl" -D "$PG_DIR/data" status >/dev/null 2>&1; then
        runuser -u postgres -- "$bin/pg_ctl" -D "$PG_DIR/data" -l "$PG_DIR/postgres.log" -w \
            -o "-p $PG_PORT -k $PG_DIR -c listen_addresses=127.0.0.1" start >/dev/null \
            || fail "PostgreSQL did not start; see $PG_DIR/postgres.log"
    fi
    local psql=("$bin/psql" -h "$PG_DIR" -p "$PG_PORT" -U postgres -d postgres -qtA)
    if [ "$(runuser -u postgres -- "${psql[@]}" -c "SELECT 1 FROM pg_roles WHERE rolname='$PG_USER'")" != 1 ]; then
        runuser -u postgres -- "${psql[@]}" -c "CREATE ROLE $PG_USER LOGIN PASSWORD '$PG_USER'" >/dev/null
    fi
    if [ "$(runuser -u postgres -- "${psql[@]}" -c "SELECT 1 FROM pg_database WHERE datname='$PG_DB'")" != 1 ]; then
        runuser -u postgres -- "${psql[@]}" -c "CREATE DATABASE $PG_DB OWNER $PG_USER" >/dev/null
    fi
}

up() {
    [ "$(id -u)" = 0 ] || fail "needs root (it starts munged, slurmctld, slurmd and PostgreSQL)"
    install_packages
    mkdir -p "$DIR"
    munge_up
    slurm_up
    pg_up
    echo "partition: $PARTITION"
    echo "export SLURM_CONF=$SLURM_CONF"
    echo "database: postgresql+psycopg://$PG_USER:$PG_USER@127.0.0.1:$PG_PORT/$PG_DB"
}

down() {
    if alive "$SLURM_DIR/slurmctld.pid" && command -v scancel >/dev/null; then  # (scancel waits 18 s for a controller that is gone)
        scancel --full --quiet --partition="$PARTITION" 2>/dev/null || true
    fi
    local pidfile pid pids=()
    # every daemon told at once, then waited for: each takes about 2 s to finish
    for pidfile in "$SLURM_DIR/slurmd.pid" "$SLURM_DIR/slurmctld.pid" "$MUNGE_DIR/munged.pid"; do
        if alive "$pidfile"; then
            pid=$(cat "$pidfile")
            kill "$pid" 2>/dev/null || true
            pids+=("$pid")
        fi
        rm -f "$pidfile"
    done
    if [ -f "$PG_DIR/data/PG_VERSION" ]; then
        runuser -u postgres -- "$(pg_bin)/pg_ctl" -D "$PG_DIR/data" -m fast -w stop >/dev/null 2>&1 || true
    fi
    for pid in "${pids[@]}"; do
        wait_until 20 bash -c "! kill -0 $pid 2>/dev/null" || kill -9 "$pid" 2>/dev/null || true
    done
    # slurmstepd processes of cancelled jobs end on their own; wait for them so nothing is left running
    wait_until 20 bash -c "! pgrep -x slurmstepd" || pkill -9 -x slurmstepd 2>/dev/null || true
    echo "local_cluster: down"
}

status() {
    if alive "$SLURM_DIR/slurmctld.pid" && alive "$SLURM_DIR/slurmd.pid"; then
        echo "slurm: up ($(sinfo -h -o '%P %a %D %T' 2>/dev/null | head -n 1))"
    else
        echo "slurm: down"
    fi
    if [ -f "$PG_DIR/data/PG_VERSION" ] && runuser -u postgres -- "$(pg_bin)/pg_ctl" -D "$PG_DIR/data" status >/dev/null 2>&1; then
        echo "postgresql: up (postgresql+psycopg://$PG_USER:$PG_USER@127.0.0.1:$PG_PORT/$PG_DB)"
    else
        echo "postgresql: down"
    fi
}

createdb() {  # a fresh, empty database owned by the cnnlab role: what workers meet on a new server
    local name=$1
    [[ "$name" =~ ^[a-z_][a-z0-9_]*$ ]] || fail "createdb: $name: lower-case letters, digits and _ only"
    runuser -u postgres -- "$(pg_bin)/psql" -h "$PG_DIR" -p "$PG_PORT" -U postgres -d postgres -qtA \
        -c "CREATE DATABASE $name OWNER $PG_USER" >/dev/null || fail "createdb: could not create $name"
    echo "database: postgresql+psycopg://$PG_USER:$PG_USER@127.0.0.1:$PG_PORT/$name"
}

pg_restart() {  # an outage: the server stopped (connections cut), down for SECONDS, then started again
    local bin seconds=${1:-10}
    bin=$(pg_bin)
    runuser -u postgres -- "$bin/pg_ctl" -D "$PG_DIR/data" -m fast -w stop >/dev/null || fail "pg-restart: stop failed"
    sleep "$seconds"
    runuser -u postgres -- "$bin/pg_ctl" -D "$PG_DIR/data" -l "$PG_DIR/postgres.log" -w \
        -o "-p $PG_PORT -k $PG_DIR -c listen_addresses=127.0.0.1" start >/dev/null || fail "pg-restart: start failed"
    echo "local_cluster: postgresql restarted after ${seconds} s down"
}

case "${1:-}" in
    up) up ;;
    down) down ;;
    status) status ;;
    createdb) createdb "${2:?createdb NAME}" ;;
    pg-restart) pg_restart "${2:-10}" ;;
    *) echo "usage: bash scripts/local_cluster.sh up|down|status|createdb NAME|pg-restart [SECONDS]" >&2; exit 2 ;;
esac
