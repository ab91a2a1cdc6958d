#!/usr/bin/env bash
# Single-node SLURM test bed: Debian's slurm-wlm packages, daemons started directly (no systemd needed).
#
#   bash scripts/slurm-local.sh up       install if missing, write config, start munged/slurmctld/slurmd, wait for idle
#   bash scripts/slurm-local.sh down     stop the daemons (state and config stay, so `up` is quick next time)
#   bash scripts/slurm-local.sh status   print daemon and node state; exit 0 when the node accepts jobs
#
# Safe to run twice: `up` on a running cluster only re-checks it. Needs root (apt, /etc, /var/spool).
# Environment:
#   SLURM_LOCAL_WAIT_S=90          bound on every wait
#   SLURM_LOCAL_PARTITION=debug    name of the one partition
#   SLURM_LOCAL_ACCOUNTING=1       also run slurmdbd on a local MariaDB, so `sacct` works. submitit polls
#                                  sacct to learn that a job died without writing its result (killed, time
#                                  limit, out of memory); without it such a job leaves the submitter (and so
#                                  a Hydra multirun) waiting forever. 0 = no accounting, fewer packages.
set -euo pipefail

ACCOUNTING=${SLURM_LOCAL_ACCOUNTING:-1}
PACKAGES=(slurmctld slurmd slurm-client munge)
if [[ $ACCOUNTING == 1 ]]; then
    PACKAGES+=(slurmdbd mariadb-server)
fi
CLUSTER_NAME=fer-local
PARTITION=${SLURM_LOCAL_PARTITION:-debug}
WAIT_S=${SLURM_LOCAL_WAIT_S:-90}

CONF_DIR=/etc/slurm
SLURM_CONF=$CONF_DIR/slurm.conf
LOG_DIR=/var/log/slurm
CTLD_SPOOL=/var/spool/slurmctld
SLURMD_SPOOL=/var/spool/slurmd
CTLD_PID=/run/slurmctld.pid
SLURMD_PID=/run/slurmd.pid
MUNGE_KEY=/etc/munge/munge.key
MUNGE_RUN=/run/munge
MUNGE_PID=$MUNGE_RUN/munged.pid
MUNGE_LOG=/var/log/munge/munged.log
SLURMDBD_CONF=$CONF_DIR/slurmdbd.conf
SLURMDBD_PID=/run/slurmdbd.pid
MYSQL_RUN=/run/mysqld
MYSQL_PID=$MYSQL_RUN/mysqld.pid
MYSQL_LOG=/var/log/mysql/error.log

log() { printf '[slurm-local] %s\n' "$*"; }
die() { printf '[slurm-local] ERROR: %s\n' "$*" >&2; exit 1; }

# The node name must equal what slurmd computes for itself (the short host name), or slurmd refuses to start.
node_name() { hostname -s; }

# True when the process whose id is in pid file $1 is alive (/proc, not kill -0: works for `status` as non-root).
pid_alive() {
    local pid
    pid=$(cat "$1" 2>/dev/null) && [[ $pid =~ ^[0-9]+$ && -d /proc/$pid ]]
}

# Pid from a pid file, for messages.
pid_of() { cat "$1" 2>/dev/null || echo '?'; }

show_logs() {
    local f
    for f in "$MUNGE_LOG" "$MYSQL_LOG" "$LOG_DIR/slurmdbd.log" "$LOG_DIR/slurmctld.log" "$LOG_DIR/slurmd.log"; do
        [[ -f $f ]] || continue
        printf -- '----- last lines of %s -----\n' "$f" >&2
        tail -n 25 "$f" >&2
    done
}

require_root() {
    if [[ $(id -u) -ne 0 ]]; then
        printf '[slurm-local] ERROR: needs root (installs packages, writes %s, starts daemons). ' "$SLURM_CONF" >&2
        printf 'Run: sudo bash %s %s\n' "$0" "${1:-up}" >&2
        exit 1
    fi
}

install_packages() {
    local missing=() pkg
    for pkg in "${PACKAGES[@]}"; do
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed' || missing+=("$pkg")
    done
    if [[ ${#missing[@]} -eq 0 ]]; then
        log "packages present: ${PACKAGES[*]}"
        return
    fi
    command -v apt-get >/dev/null || die "apt-get not found: this script supports Debian/Ubuntu only (missing: ${missing[*]})"
    # Package scripts would try to start the services through init scripts; there is no init system to do that
    # here and we start the daemons ourselves, so forbid it for the duration of the install (unless already so).
    local policy=/usr/sbin/policy-rc.d
    if [[ ! -e $policy ]]; then
        printf '#!/bin/sh\nexit 101\n' >"$policy"
        chmod 755 "$policy"
        trap 'rm -f /usr/sbin/policy-rc.d' EXIT
    fi
    log "installing: ${missing[*]}"
    local start=$SECONDS
    export DEBIAN_FRONTEND=noninteractive
    apt-get -q update
    apt-get -q -y -o DPkg::Lock::Timeout=300 install --no-install-recommends "${missing[@]}"
    log "installed in $((SECONDS - start)) s"
}

write_config() {
    local node cpus mem_mb tmp
    node=$(node_name)
    [[ -n $node ]] || die "hostname -s printed nothing: set a host name first"
    cpus=$(nproc --all)
    # RealMemory in MB from the kernel; slurm refuses jobs asking for more (--mem) than this.
    mem_mb=$(awk '/^MemTotal:/ {print int($2 / 1024)}' /proc/meminfo)
    install -d -m 0755 "$CONF_DIR" "$LOG_DIR" "$CTLD_SPOOL" "$SLURMD_SPOOL"
    tmp=$(mktemp)
    cat >"$tmp" <<EOF
# Written by scripts/slurm-local.sh: a one-node test cluster. Edits are overwritten by the next 'up'.
ClusterName=$CLUSTER_NAME
# Control host and compute node are this machine; 127.0.0.1 because container host names may not resolve.
SlurmctldHost=$node(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
# No cgroup/systemd on a bare container: track processes by parent id, do not bind tasks to cpus.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
$(accounting_lines)
JobCompType=jobcomp/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
# A node that went down (daemon restart, missed heartbeat) comes back by itself once it registers.
ReturnToService=2
# The node line below gives only CPUs and memory; trust it over the detected layout (hyper-threads,
# sockets) so the node is never drained for a layout mismatch and each cpu is one schedulable core.
SlurmdParameters=config_overrides
StateSaveLocation=$CTLD_SPOOL
SlurmdSpoolDir=$SLURMD_SPOOL
SlurmctldPidFile=$CTLD_PID
SlurmdPidFile=$SLURMD_PID
SlurmctldLogFile=$LOG_DIR/slurmctld.log
SlurmdLogFile=$LOG_DIR/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
SlurmctldTimeout=30
SlurmdTimeout=60
InactiveLimit=0
# Keep finished jobs visible to squeue/scontrol for 10 min (also the only record when accounting is off).
MinJobAge=600
KillWait=10
Waittime=0
NodeName=$node NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN
PartitionName=$PARTITION Nodes=$node Default=YES MaxTime=INFINITE State=UP
EOF
    if [[ -f $SLURM_CONF ]] && cmp -s "$tmp" "$SLURM_CONF"; then
        rm -f "$tmp"
        CONFIG_CHANGED=0
    else
        install -m 0644 "$tmp" "$SLURM_CONF"
        rm -f "$tmp"
        CONFIG_CHANGED=1
        log "wrote $SLURM_CONF (node $node: $cpus cpus, $mem_mb MB, partition $PARTITION)"
    fi
}

accounting_lines() {
    if [[ $ACCOUNTING == 1 ]]; then
        printf 'AccountingStorageType=accounting_storage/slurmdbd\nAccountingStorageHost=127.0.0.1\n'
    else
        printf 'AccountingStorageType=accounting_storage/none\n'
    fi
}

write_dbd_config() {
    local tmp
    tmp=$(mktemp)
    cat >"$tmp" <<EOF
# Written by scripts/slurm-local.sh: accounting daemon on a local MariaDB (root over its unix socket, no password).
AuthType=auth/munge
DbdHost=localhost
DbdAddr=127.0.0.1
SlurmUser=root
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageUser=root
StorageLoc=slurm_acct_db
PidFile=$SLURMDBD_PID
LogFile=$LOG_DIR/slurmdbd.log
DebugLevel=info
EOF
    # slurmdbd refuses a config that others can read (it may hold a database password).
    install -m 0600 "$tmp" "$SLURMDBD_CONF"
    rm -f "$tmp"
}

start_mariadb() {
    if pid_alive "$MYSQL_PID" && mariadb -e 'SELECT 1' >/dev/null 2>&1; then
        log "mariadb already running"
        return
    fi
    [[ -d /var/lib/mysql/mysql ]] || die "MariaDB data dir /var/lib/mysql is not initialised (mariadb-server install incomplete?)"
    install -d -o mysql -g mysql -m 0755 "$MYSQL_RUN" "$(dirname "$MYSQL_LOG")"
    rm -f "$MYSQL_PID"
    # mariadbd does not daemonise itself: detach it with no inherited stdio (a CI pipe would otherwise never close).
    setsid /usr/sbin/mariadbd --user=mysql --pid-file="$MYSQL_PID" --log-error="$MYSQL_LOG" \
        --innodb-lock-wait-timeout=900 </dev/null >/dev/null 2>&1 &
    wait_for "mariadb answering" "mariadb -e 'SELECT 1' >/dev/null 2>&1"
    log "started mariadb"
}

start_accounting() {
    start_mariadb
    write_dbd_config
    start_daemon slurmdbd "$SLURMDBD_PID" /usr/sbin/slurmdbd
    wait_for "slurmdbd answering" 'sacctmgr -n -P show cluster format=cluster >/dev/null 2>&1'
    if ! sacctmgr -n -P show cluster format=cluster | grep -qx "$CLUSTER_NAME"; then
        sacctmgr -i add cluster "$CLUSTER_NAME" >/dev/null
        log "registered cluster $CLUSTER_NAME in the accounting database"
    fi
}

start_munge() {
    if pid_alive "$MUNGE_PID" && munge -n </dev/null | unmunge >/dev/null 2>&1; then
        log "munged already running"
        return
    fi
    getent passwd munge >/dev/null || die "user 'munge' missing: the munge package did not install correctly"
    install -d -o munge -g munge -m 0700 /etc/munge /var/lib/munge /var/log/munge
    install -d -o munge -g munge -m 0755 "$MUNGE_RUN"
    if [[ ! -s $MUNGE_KEY ]]; then
        log "creating $MUNGE_KEY"
        dd if=/dev/urandom of="$MUNGE_KEY" bs=1024 count=1 status=none
    fi
    chown munge:munge "$MUNGE_KEY"
    chmod 0400 "$MUNGE_KEY"
    rm -f "$MUNGE_PID" "$MUNGE_RUN/munge.socket.2.lock"
    runuser -u munge -- /usr/sbin/munged --pid-file="$MUNGE_PID" --log-file="$MUNGE_LOG"
    wait_for "munged answering" 'munge -n </dev/null | unmunge >/dev/null 2>&1'
    log "started munged"
}

start_daemon() {  # name pidfile command...
    local name=$1 pidfile=$2
    shift 2
    if pid_alive "$pidfile"; then
        log "$name already running (pid $(pid_of "$pidfile"))"
        return
    fi
    rm -f "$pidfile"
    "$@" || { show_logs; die "$name failed to start: $*"; }
    wait_for "$name running" "pid_alive $pidfile"
    log "started $name"
}

# Poll a shell condition once a second for at most WAIT_S seconds; on timeout print the logs and fail.
wait_for() {
    local what=$1 cond=$2 deadline=$((SECONDS + WAIT_S))
    until eval "$cond"; do
        if ((SECONDS >= deadline)); then
            show_logs
            die "timed out after $WAIT_S s waiting for: $what"
        fi
        sleep 1
    done
}

node_state() { sinfo -h -N -n "$(node_name)" -o '%T' 2>/dev/null | head -n 1; }

node_ready() { [[ $(node_state) =~ ^(idle|mixed|allocated|completing)$ ]]; }

cmd_up() {
    install_packages
    write_config
    start_munge
    if [[ $ACCOUNTING == 1 ]]; then
        start_accounting
    fi
    if ((CONFIG_CHANGED)) && pid_alive "$CTLD_PID"; then
        # A running controller must be restarted to pick up a changed node or partition line.
        log "config changed: restarting slurm daemons"
        stop_slurm
    fi
    start_daemon slurmctld "$CTLD_PID" /usr/sbin/slurmctld
    wait_for "slurmctld answering" 'scontrol ping 2>/dev/null | grep -q UP'
    start_daemon slurmd "$SLURMD_PID" /usr/sbin/slurmd
    local deadline=$((SECONDS + WAIT_S)) resumed=0 state
    until node_ready; do
        state=$(node_state)
        # A node drained or down from an earlier run (state is kept in the spool) does not come back alone.
        if [[ $state =~ ^(drained|draining|down|fail) ]] && ((resumed == 0)); then
            log "node $(node_name) is '$state': resuming it"
            scontrol update NodeName="$(node_name)" State=RESUME || true
            resumed=1
        fi
        if ((SECONDS >= deadline)); then
            show_logs
            sinfo -N -l >&2 || true
            die "node $(node_name) not idle after $WAIT_S s (state: '${state:-unknown}')"
        fi
        sleep 1
    done
    log "cluster up: node $(node_name) is $(node_state) in partition $PARTITION"
    sinfo
}

stop_one() {  # name pidfile
    local name=$1 pidfile=$2 pid deadline
    pid_alive "$pidfile" || { rm -f "$pidfile"; return 0; }
    pid=$(cat "$pidfile")
    kill -TERM "$pid" 2>/dev/null || true
    deadline=$((SECONDS + 30))
    while kill -0 "$pid" 2>/dev/null; do
        if ((SECONDS >= deadline)); then
            log "$name (pid $pid) ignored SIGTERM for 30 s: sending SIGKILL"
            kill -KILL "$pid" 2>/dev/null || true
            break
        fi
        sleep 0.5
    done
    rm -f "$pidfile"
    log "stopped $name"
}

stop_slurm() {
    stop_one slurmd "$SLURMD_PID"
    stop_one slurmctld "$CTLD_PID"
}

cmd_down() {
    stop_slurm
    # Stopped whatever SLURM_LOCAL_ACCOUNTING says now: an earlier `up` may have started them.
    stop_one slurmdbd "$SLURMDBD_PID"
    stop_one mariadb "$MYSQL_PID"
    stop_one munged "$MUNGE_PID"
    log "cluster down"
}

cmd_status() {
    local name pidfile rc=0 names=(munged slurmctld slurmd)
    [[ $ACCOUNTING == 1 ]] && names=(munged mariadb slurmdbd slurmctld slurmd)
    for name in "${names[@]}"; do
        case $name in
            munged) pidfile=$MUNGE_PID ;;
            mariadb) pidfile=$MYSQL_PID ;;
            slurmdbd) pidfile=$SLURMDBD_PID ;;
            slurmctld) pidfile=$CTLD_PID ;;
            slurmd) pidfile=$SLURMD_PID ;;
        esac
        if [[ -e $pidfile && ! -r $pidfile ]]; then
            # mariadb's pid file is private to its user; the node check below still tells whether jobs run.
            log "$name: unknown (cannot read $pidfile as $(id -un); run status as root)"
        elif pid_alive "$pidfile"; then
            log "$name: running (pid $(pid_of "$pidfile"))"
        else
            log "$name: not running"
            rc=1
        fi
    done
    if command -v sinfo >/dev/null && ((rc == 0)); then
        sinfo -N -l || rc=1
        node_ready || rc=1
    fi
    if ((rc == 0)); then
        log "status: up"
    else
        log "status: not ready"
    fi
    return $rc
}

main() {
    local action=${1:-}
    case $action in
        up) require_root up; cmd_up ;;
        down) require_root down; cmd_down ;;
        status) cmd_status ;;
        *) die "usage: $0 up|down|status" ;;
    esac
}

main "$@"
