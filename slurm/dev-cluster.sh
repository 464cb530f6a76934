#!/usr/bin/env bash
# dev-cluster.sh: a real, single-machine Slurm cluster for tests, CI and trying tsdia without a cluster.
#
#   slurm/dev-cluster.sh start [--nodes N] [--cpus-per-node C] [--accounting|--no-accounting]
#   slurm/dev-cluster.sh stop
#   slurm/dev-cluster.sh status
#
# Runs as root on Debian/Ubuntu without systemd (it starts the daemons itself). N slurmd daemons on this host
# play N nodes n1..nN. See slurm/README.md for the layout, logs and troubleshooting.
set -euo pipefail

# ---- fixed layout (Debian's slurm-wlm reads /etc/slurm/slurm.conf) -------------------------------------------------
readonly CONF_DIR=/etc/slurm
readonly SLURM_CONF_FILE=$CONF_DIR/slurm.conf
readonly DBD_CONF_FILE=$CONF_DIR/slurmdbd.conf
readonly LOG_DIR=/var/log/slurm
readonly STATE_DIR=/var/lib/slurm/slurmctld
readonly SPOOL_ROOT=/var/lib/slurm/slurmd
readonly RUN_DIR=/run/tsdia-dev-cluster # what this script started (so stop only stops that), and its lock
readonly CTLD_PID=/run/slurmctld.pid
readonly DBD_PID=/run/slurmdbd.pid
readonly MUNGE_PID=/run/munge/munged.pid
readonly DAEMON_OUT=$LOG_DIR/dev-cluster-daemons.out # stdout/stderr of the daemons we launch
readonly CLUSTER_NAME=dev
readonly NODE_PORT_BASE=17000 # node nI listens on 17000+I; slurmctld 6817, slurmdbd 6819
# Bump when the generated configuration changes meaning, so a running cluster with an older one is restarted.
readonly CONF_VERSION=4
# Local-only database password: mariadb listens on 127.0.0.1 and this is a throwaway dev cluster.
readonly DB_PASS=tsdia-dev-cluster
TIMEOUT_S=${DEV_CLUSTER_TIMEOUT:-60}

PROG=${0##*/}
log() { printf '[%s] %s\n' "$PROG" "$*" >&2; }
die() {
    printf '[%s] ERROR: %s\n' "$PROG" "$*" >&2
    exit 1
}

usage() {
    cat <<EOF
Usage:
  $PROG start [--nodes N] [--cpus-per-node C] [--accounting|--no-accounting]
      Install Slurm if needed and start a local cluster (idempotent). Defaults: 2 nodes, 2 CPUs each,
      accounting on (slurmdbd + mariadb, so sacct and submitit's job.state work).
  $PROG stop
      Cancel all jobs and stop every daemon this script started (idempotent).
  $PROG status
      Show daemons, sinfo and squeue; exit 1 when the cluster is not running, 2 when it is degraded.
Environment: DEV_CLUSTER_TIMEOUT (seconds to wait for daemons and nodes, default 60).
EOF
}

# ---- small helpers -------------------------------------------------------------------------------------------------

# pid_alive PIDFILE NAME: the pid in PIDFILE is a live process called NAME (guards against pid reuse).
pid_alive() {
    local pid
    [[ -s $1 ]] || return 1
    pid=$(<"$1")
    [[ $pid =~ ^[0-9]+$ ]] || return 1
    [[ -r /proc/$pid/comm && $(<"/proc/$pid/comm") == "$2" ]]
}

# wait_for SECONDS DESCRIPTION CMD...: poll CMD every 0.2 s until it succeeds; return 1 on timeout.
wait_for() {
    local secs=$1 what=$2 deadline
    shift 2
    deadline=$((SECONDS + secs))
    until "$@" >/dev/null 2>&1; do
        if ((SECONDS >= deadline)); then
            log "timed out after ${secs}s waiting for $what"
            return 1
        fi
        sleep 0.2
    done
}

# launch CMD...: start a daemon. Its output goes to a log file and it must not inherit our lock (fd 9) or our
# stdout: a caller such as subprocess.run(capture_output=True) would otherwise wait for the daemon to exit.
launch() {
    "$@" </dev/null >>"$DAEMON_OUT" 2>&1 9>&-
}

# stop_daemons PIDFILE:NAME...: SIGTERM them all at once (each takes 1-4 s to shut down), wait up to 15 s,
# then SIGKILL what is left.
stop_daemons() {
    local spec pidfile name pids=() pid i alive
    for spec in "$@"; do
        pidfile=${spec%%:*} name=${spec#*:}
        if pid_alive "$pidfile" "$name"; then
            pid=$(<"$pidfile")
            kill -TERM "$pid" 2>/dev/null || true
            pids+=("$pid")
        fi
        rm -f "$pidfile"
    done
    ((${#pids[@]})) || return 0
    for ((i = 0; i < 75; i++)); do
        alive=0
        for pid in "${pids[@]}"; do [[ -d /proc/$pid ]] && alive=1; done
        ((alive)) || return 0
        sleep 0.2
    done
    for pid in "${pids[@]}"; do
        if [[ -d /proc/$pid ]]; then
            log "$(cat "/proc/$pid/comm" 2>/dev/null) (pid $pid) ignored SIGTERM for 15 s: sending SIGKILL"
            kill -KILL "$pid" 2>/dev/null || true
        fi
    done
}

# descendants PID: all descendant pids of PID, deepest last.
descendants() {
    local kids kid
    kids=$(ps -o pid= --ppid "$1" 2>/dev/null || true)
    for kid in $kids; do
        echo "$kid"
        descendants "$kid"
    done
}

# show_log_tails [NODE...]: the end of each daemon log (of the named nodes' slurmd logs only, when given).
show_log_tails() {
    local f files=("$LOG_DIR/slurmdbd.log" "$LOG_DIR/slurmctld.log") node
    if (($#)); then
        for node in "$@"; do files+=("$LOG_DIR/slurmd-$node.log"); done
    else
        files+=("$LOG_DIR"/slurmd-*.log)
    fi
    for f in "${files[@]}" "$DAEMON_OUT"; do
        [[ -s $f ]] || continue
        printf '\n----- last lines of %s -----\n' "$f" >&2
        tail -n 8 "$f" >&2
    done
}

fail_with_logs() {
    show_log_tails
    die "$*"
}

require_root() {
    [[ $EUID -eq 0 ]] || die "must run as root (it installs packages and starts system daemons). HINT: sudo $0 $*"
}

# Serialise concurrent invocations (e.g. parallel test workers all calling start).
take_lock() {
    mkdir -p "$RUN_DIR"
    exec 9>"$RUN_DIR/lock"
    flock -w 300 9 || die "another $PROG is still running after 300 s (lock $RUN_DIR/lock)"
}

# ---- installation ----------------------------------------------------------------------------------------------------

pkg_installed() {
    [[ $(dpkg-query -W -f='${Status}' "$1" 2>/dev/null || true) == "install ok installed" ]]
}

ensure_packages() {
    local want=(slurmctld slurmd slurm-client munge) missing=() p added_policy=0
    if ((ACCOUNTING)); then want+=(slurmdbd mariadb-server); fi
    for p in "${want[@]}"; do pkg_installed "$p" || missing+=("$p"); done
    ((${#missing[@]})) || return 0
    command -v apt-get >/dev/null || die "missing packages (${missing[*]}) and no apt-get: install them by hand"
    log "installing ${missing[*]} (apt-get, ~20-40 s)"
    # Keep package scripts from starting the daemons with the packaged defaults (on a machine with systemd or
    # sysvinit they would): this script starts them with its own configuration. Docker images ship the same file.
    if [[ ! -e /usr/sbin/policy-rc.d ]]; then
        printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
        chmod 755 /usr/sbin/policy-rc.d
        added_policy=1
    fi
    local rc=0
    {
        DEBIAN_FRONTEND=noninteractive apt-get update -qq &&
            DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
    } >"$RUN_DIR/apt.log" 2>&1 || rc=$?
    if ((added_policy)); then rm -f /usr/sbin/policy-rc.d; fi
    if ((rc)); then
        tail -n 30 "$RUN_DIR/apt.log" >&2
        die "apt-get failed (exit $rc); full log in $RUN_DIR/apt.log"
    fi
}

# ---- configuration ---------------------------------------------------------------------------------------------------

signature() { echo "# tsdia-dev-cluster: nodes=$NODES cpus=$CPUS accounting=$ACCOUNTING version=$CONF_VERSION"; }

current_signature() { head -n 1 "$SLURM_CONF_FILE" 2>/dev/null || true; }

write_slurm_conf() {
    local host mem_avail_kb mem_mb acct_lines
    host=$(hostname -s)
    # Give the nodes together ~3/4 of the memory available now (MemAvailable), split evenly.
    mem_avail_kb=$(awk '/^MemAvailable:/ {print $2}' /proc/meminfo)
    mem_mb=$((mem_avail_kb * 3 / (4 * 1024 * NODES)))
    ((mem_mb >= 256)) || mem_mb=256
    if ((ACCOUNTING)); then
        acct_lines="AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
AccountingStoragePort=6819"
    else
        acct_lines="AccountingStorageType=accounting_storage/none"
    fi
    mkdir -p "$CONF_DIR"
    cat >"$SLURM_CONF_FILE.tmp" <<EOF
$(signature)
# Written by slurm/dev-cluster.sh; rewritten on every start with different settings. Edits are lost.
ClusterName=$CLUSTER_NAME
# host(address) form: no name resolution needed for the controller.
SlurmctldHost=$host(127.0.0.1)
AuthType=auth/munge
# A requeued job reruns only after its credential expires (+1 s): 120 s by default, ~12 s with this.
AuthInfo=cred_expire=10
CredType=cred/munge
SlurmUser=slurm
SlurmdUser=root
SlurmctldPort=6817
SlurmdPort=6818
StateSaveLocation=$STATE_DIR
SlurmdSpoolDir=$SPOOL_ROOT/%n
SlurmctldPidFile=$CTLD_PID
SlurmdPidFile=/run/slurmd-%n.pid
SlurmctldLogFile=$LOG_DIR/slurmctld.log
SlurmdLogFile=$LOG_DIR/slurmd-%n.log
# No cgroup dependence: works in containers and on hybrid-cgroup hosts.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
$acct_lines
JobCompType=jobcomp/none
SchedulerType=sched/backfill
# Schedule every 2 s: sbatch -> RUNNING in well under a second.
SchedulerParameters=sched_interval=2,bf_interval=2
SelectType=select/cons_tres
# Cores only (not memory) are consumed, so small jobs without --mem can share a node.
SelectTypeParameters=CR_Core
# Trust the CPU counts below even when they exceed the real cores (all nodes share this host).
SlurmdParameters=config_overrides
ReturnToService=2
# Batch jobs are requeueable by default (scontrol requeue, submitit checkpoint/requeue, preemption).
JobRequeue=1
# Jobs in 'debug' and 'graced' are requeued when a job in 'urgent' needs their CPUs (real preemption for
# tests). 'debug' has no GraceTime: SIGTERM to every process, SIGKILL after KillWait. 'graced' has
# GraceTime=5: SIGTERM while the job still runs, the requeue (another SIGTERM) after the grace.
PreemptType=preempt/partition_prio
PreemptMode=REQUEUE
MpiDefault=none
SwitchType=switch/none
MailProg=/bin/true
InactiveLimit=0
# SIGTERM -> SIGKILL delay on cancel/timeout/preemption: quick tests, yet time for a graceful checkpoint.
KillWait=10
# Finished jobs stay in squeue/scontrol for an hour (sacct keeps them for good when accounting is on).
MinJobAge=3600
Waittime=0
NodeName=n[1-$NODES] NodeHostname=$host NodeAddr=127.0.0.1 Port=$((NODE_PORT_BASE + 1))-$((NODE_PORT_BASE + NODES)) CPUs=$CPUS Sockets=1 CoresPerSocket=$CPUS ThreadsPerCore=1 RealMemory=$mem_mb State=UNKNOWN
PartitionName=debug Nodes=n[1-$NODES] Default=YES MaxTime=INFINITE State=UP PriorityTier=1
PartitionName=graced Nodes=n[1-$NODES] Default=NO MaxTime=INFINITE State=UP PriorityTier=1 GraceTime=5
PartitionName=urgent Nodes=n[1-$NODES] Default=NO MaxTime=INFINITE State=UP PriorityTier=10 PreemptMode=OFF
EOF
    mv -f "$SLURM_CONF_FILE.tmp" "$SLURM_CONF_FILE"
    chmod 644 "$SLURM_CONF_FILE"

    if ((ACCOUNTING)); then
        # slurmdbd refuses a config that is not owned by SlurmUser with mode 600 (it holds the DB password).
        install -m 600 -o slurm -g slurm /dev/null "$DBD_CONF_FILE.tmp"
        cat >"$DBD_CONF_FILE.tmp" <<EOF
# Written by slurm/dev-cluster.sh.
AuthType=auth/munge
DbdHost=localhost
DbdAddr=127.0.0.1
DbdPort=6819
SlurmUser=slurm
PidFile=$DBD_PID
LogFile=$LOG_DIR/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageUser=slurm
StoragePass=$DB_PASS
StorageLoc=slurm_acct_db
EOF
        mv -f "$DBD_CONF_FILE.tmp" "$DBD_CONF_FILE"
    fi
}

prepare_dirs() {
    local i
    mkdir -p "$LOG_DIR" "$STATE_DIR"
    for ((i = 1; i <= NODES; i++)); do mkdir -p "$SPOOL_ROOT/n$i"; done
    chown slurm:slurm "$STATE_DIR" "$LOG_DIR"
    # slurmctld refuses to start on state saved under another ClusterName: that state is not ours, drop it.
    if [[ -f $STATE_DIR/clustername && $(<"$STATE_DIR/clustername") != "$CLUSTER_NAME" ]]; then
        log "removing saved controller state of another cluster ($(<"$STATE_DIR/clustername")) in $STATE_DIR"
        find "$STATE_DIR" -mindepth 1 -delete
    fi
}

# ---- node names ------------------------------------------------------------------------------------------------
# Jobs see node names (SLURM_JOB_NODELIST=n[1-2], SLURMD_NODENAME=n1) and use them as addresses, e.g. the first node
# as MASTER_ADDR for torch.distributed, which then hangs retrying "n1: Name or service not known". On a real cluster
# node names resolve; here a marked block in /etc/hosts maps them to 127.0.0.1 (removed again by stop).
readonly HOSTS_BEGIN="# BEGIN tsdia-dev-cluster node names (slurm/dev-cluster.sh)"
readonly HOSTS_END="# END tsdia-dev-cluster"

hosts_without_block() {
    awk -v b="$HOSTS_BEGIN" -v e="$HOSTS_END" '$0 == b {skip = 1} !skip {print} $0 == e {skip = 0}' /etc/hosts
}

ensure_hosts() {
    local want current
    want=$(printf '%s\n127.0.0.1 %s\n%s' "$HOSTS_BEGIN" "$(seq -f 'n%g' -s ' ' 1 "$NODES")" "$HOSTS_END")
    current=$(awk -v b="$HOSTS_BEGIN" -v e="$HOSTS_END" '$0 == b {f = 1} f {print} $0 == e {f = 0}' /etc/hosts)
    [[ $current == "$want" ]] && return 0
    # Rewrite in place rather than rename: in containers /etc/hosts is a bind mount.
    if ! printf '%s\n%s\n' "$(hosts_without_block)" "$want" 2>/dev/null >/etc/hosts; then
        log "WARNING: cannot write /etc/hosts: node names n1..n$NODES will not resolve inside jobs" \
            "(torch.distributed with MASTER_ADDR=<node name> will hang). HINT: add '127.0.0.1 n1 ... n$NODES' to it"
    fi
}

remove_hosts() {
    grep -qxF "$HOSTS_BEGIN" /etc/hosts 2>/dev/null || return 0
    printf '%s\n' "$(hosts_without_block)" 2>/dev/null >/etc/hosts || log "WARNING: cannot write /etc/hosts"
}

# ---- daemons -----------------------------------------------------------------------------------------------------

munge_ok() { munge -n 2>/dev/null | unmunge >/dev/null 2>&1; }

start_munge() {
    if [[ ! -s /etc/munge/munge.key ]]; then
        log "creating the munge key"
        mungekey --create --keyfile=/etc/munge/munge.key
    fi
    chown munge:munge /etc/munge/munge.key
    chmod 400 /etc/munge/munge.key
    munge_ok && return 0
    mkdir -p /run/munge
    chown munge:munge /run/munge
    chmod 755 /run/munge
    # --force: start even if an unclean stop left the socket behind.
    launch runuser -u munge -- /usr/sbin/munged --force
    wait_for "$TIMEOUT_S" munged munge_ok || fail_with_logs "munged did not start (see /var/log/munge/munged.log)"
    touch "$RUN_DIR/started-munge"
}

db_ok() { mysqladmin --silent ping; }

start_mariadb() {
    if ! db_ok >/dev/null 2>&1; then
        log "starting mariadb"
        launch /etc/init.d/mariadb start || true
        wait_for "$TIMEOUT_S" mariadb db_ok || fail_with_logs "mariadb did not start (see /var/log/mysql/ or $DAEMON_OUT)"
        touch "$RUN_DIR/started-mariadb"
    fi
    # root reaches mariadb through its unix socket; slurmdbd logs in with a password over localhost.
    mysql -e "CREATE DATABASE IF NOT EXISTS slurm_acct_db;
CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY '$DB_PASS';
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';" ||
        die "could not create the slurm database/user in mariadb"
}

dbd_ok() { sacctmgr -n -P list cluster format=cluster; }

start_slurmdbd() {
    if ! pid_alive "$DBD_PID" slurmdbd; then
        launch slurmdbd
    fi
    wait_for "$TIMEOUT_S" slurmdbd dbd_ok || fail_with_logs "slurmdbd does not answer sacctmgr"
    if ! sacctmgr -n -P list cluster format=cluster 2>/dev/null | grep -qx "$CLUSTER_NAME"; then
        sacctmgr -i add cluster "$CLUSTER_NAME" >/dev/null || die "sacctmgr add cluster $CLUSTER_NAME failed"
    fi
}

ctld_ok() { scontrol ping 2>/dev/null | grep -q 'is UP'; }

start_slurmctld() {
    pid_alive "$CTLD_PID" slurmctld || launch slurmctld
    wait_for "$TIMEOUT_S" slurmctld ctld_ok || fail_with_logs "slurmctld did not come up"
}

start_slurmds() {
    local i
    for ((i = 1; i <= NODES; i++)); do
        pid_alive "/run/slurmd-n$i.pid" slurmd || launch slurmd -N "n$i"
    done
}

# All NODES nodes answer and can take jobs: idle, or busy with jobs if the cluster was already running ("planned":
# kept free by the backfill scheduler for a pending job).
nodes_ready() {
    local states
    states=$(sinfo -h -N -p debug -o '%N %T' 2>/dev/null) || return 1
    [[ $(grep -cE '^n[0-9]+ (idle|mixed|allocated|completing|planned|reserved)$' <<<"$states") -eq $NODES ]]
}

wait_nodes() {
    local bad
    if ! wait_for "$TIMEOUT_S" "all $NODES nodes to be idle" nodes_ready; then
        sinfo -N -p debug -o '%N %T %E' >&2 || true
        bad=$(sinfo -h -N -p debug -o '%N %T' 2>/dev/null | awk '$2 !~ /^(idle|mixed|allocated|completing|planned|reserved)$/ {print $1}')
        # shellcheck disable=SC2086
        show_log_tails $bad
        die "nodes did not become idle within ${TIMEOUT_S}s (DEV_CLUSTER_TIMEOUT raises the limit). HINT: the logs above name the cause; '$0 stop' then start again"
    fi
}

slurm_daemons_alive() {
    local i
    pid_alive "$CTLD_PID" slurmctld || return 1
    if ((ACCOUNTING)); then pid_alive "$DBD_PID" slurmdbd || return 1; fi
    for ((i = 1; i <= NODES; i++)); do pid_alive "/run/slurmd-n$i.pid" slurmd || return 1; done
}

any_slurm_daemon_alive() {
    local f
    pid_alive "$CTLD_PID" slurmctld && return 0
    pid_alive "$DBD_PID" slurmdbd && return 0
    for f in /run/slurmd-*.pid; do [[ -e $f ]] && pid_alive "$f" slurmd && return 0; done
    return 1
}

# Cancel every job, then stop slurmd/slurmctld/slurmdbd. Job processes are SIGKILLed rather than given KillWait
# to exit: a job that is still completing slows slurmctld's shutdown and the next start by 10-20 s.
stop_slurm_daemons() {
    local f pids pid i specs
    if ctld_ok; then
        pids=$(squeue -h -o %A 2>/dev/null || true)
        # shellcheck disable=SC2086 # word splitting of job ids intended
        [[ -z $pids ]] || scancel $pids 2>/dev/null || true
    fi
    # slurmstepd is started only by slurmd, i.e. by this cluster: its children are job processes.
    kill_job_processes
    if ctld_ok; then
        for ((i = 0; i < 50; i++)); do
            [[ -z $(squeue -h -t RUNNING,COMPLETING -o %A 2>/dev/null) ]] && break
            sleep 0.2
        done
    fi
    specs=("$CTLD_PID:slurmctld" "$DBD_PID:slurmdbd")
    for f in /run/slurmd-*.pid; do [[ -e $f ]] && specs+=("$f:slurmd"); done
    stop_daemons "${specs[@]}"
    # A step daemon outlives slurmd only if its job could not be cancelled (e.g. slurmctld was already dead).
    for pid in $(pgrep -x slurmstepd || true); do
        log "killing leftover slurmstepd $pid and its processes"
        # shellcheck disable=SC2046
        kill -KILL "$pid" $(descendants "$pid") 2>/dev/null || true
    done
}

# SIGKILL every process under every slurmstepd (the job's batch script and tasks), sparing slurmstepd itself so
# it can report the job's end to slurmctld.
kill_job_processes() {
    local step victims
    for step in $(pgrep -x slurmstepd || true); do
        victims=$(descendants "$step")
        # shellcheck disable=SC2086
        [[ -z $victims ]] || kill -KILL $victims 2>/dev/null || true
    done
}

# ---- commands ----------------------------------------------------------------------------------------------------

cmd_start() {
    local t0=$SECONDS
    NODES=2 CPUS=2 ACCOUNTING=1
    while (($#)); do
        case $1 in
        --nodes) NODES=${2:-} && shift ;;
        --nodes=*) NODES=${1#*=} ;;
        --cpus-per-node) CPUS=${2:-} && shift ;;
        --cpus-per-node=*) CPUS=${1#*=} ;;
        --accounting) ACCOUNTING=1 ;;
        --no-accounting) ACCOUNTING=0 ;;
        -h | --help) usage && exit 0 ;;
        *) die "start: unknown option '$1' (valid: --nodes N, --cpus-per-node C, --accounting, --no-accounting)" ;;
        esac
        shift
    done
    if ! [[ $NODES =~ ^[1-9][0-9]*$ ]] || ((NODES > 64)); then
        die "--nodes must be an integer from 1 to 64, got '$NODES'"
    fi
    if ! [[ $CPUS =~ ^[1-9][0-9]*$ ]] || ((CPUS > 256)); then
        die "--cpus-per-node must be an integer from 1 to 256, got '$CPUS'"
    fi
    require_root start
    take_lock
    ensure_packages
    ensure_hosts

    if [[ $(current_signature) == "$(signature)" ]] && slurm_daemons_alive && munge_ok && nodes_ready &&
        { ((ACCOUNTING == 0)) || db_ok >/dev/null 2>&1; }; then
        log "already running: $NODES nodes x $CPUS CPUs, accounting=$ACCOUNTING ($((SECONDS - t0)) s)"
        return 0
    fi
    if [[ $(current_signature) != "$(signature)" ]]; then
        if [[ -e $SLURM_CONF_FILE ]] && any_slurm_daemon_alive; then
            log "running with other settings ($(current_signature | cut -c3-)): restarting"
            stop_slurm_daemons
        fi
        write_slurm_conf
    fi
    # From here on the configuration matches: start whatever is not running (all of it after a stop).
    prepare_dirs
    start_munge
    if ((ACCOUNTING)); then
        start_mariadb
        start_slurmdbd
    elif pid_alive "$DBD_PID" slurmdbd; then
        stop_daemons "$DBD_PID:slurmdbd"
    fi
    start_slurmctld
    start_slurmds
    wait_nodes
    log "cluster up in $((SECONDS - t0)) s: $NODES nodes (n1-n$NODES) x $CPUS CPUs, partition 'debug', accounting=$ACCOUNTING"
    log "logs: $LOG_DIR/{slurmctld,slurmd-nI,slurmdbd}.log; stop with: $0 stop"
}

cmd_stop() {
    local mariadb_job=
    require_root stop
    take_lock
    if command -v scontrol >/dev/null; then stop_slurm_daemons; fi
    # mariadb and munged only if this script started them (they may serve other things); both at once.
    if [[ -e $RUN_DIR/started-mariadb ]]; then
        /etc/init.d/mariadb stop </dev/null >>"$DAEMON_OUT" 2>&1 9>&- &
        mariadb_job=$!
    fi
    if [[ -e $RUN_DIR/started-munge ]]; then
        stop_daemons "$MUNGE_PID:munged"
        rm -f "$RUN_DIR/started-munge"
    fi
    if [[ -n $mariadb_job ]]; then
        wait "$mariadb_job" || log "mariadb stop failed (see $DAEMON_OUT)"
        rm -f "$RUN_DIR/started-mariadb"
    fi
    remove_hosts
    log "stopped"
}

cmd_status() {
    local sig nodes i rc=0
    if ! command -v scontrol >/dev/null || ! ctld_ok; then
        echo "dev cluster: not running (start it with: $0 start)"
        return 1
    fi
    sig=$(current_signature)
    echo "dev cluster:${sig#\# tsdia-dev-cluster:}"
    echo "  slurmctld: pid $(cat "$CTLD_PID" 2>/dev/null)"
    if [[ $sig == *accounting=1* ]]; then
        if pid_alive "$DBD_PID" slurmdbd; then echo "  slurmdbd: pid $(<"$DBD_PID")"; else
            echo "  slurmdbd: NOT RUNNING"
            rc=2
        fi
    fi
    nodes=$(sed -n 's/.* nodes=\([0-9]*\) .*/\1/p' <<<"$sig")
    for ((i = 1; i <= ${nodes:-0}; i++)); do
        if pid_alive "/run/slurmd-n$i.pid" slurmd; then echo "  slurmd n$i: pid $(<"/run/slurmd-n$i.pid")"; else
            echo "  slurmd n$i: NOT RUNNING"
            rc=2
        fi
    done
    ((rc == 0)) || echo "  degraded: '$0 start' restarts what is missing"
    echo
    sinfo
    echo
    squeue
    return "$rc"
}

main() {
    local cmd=${1:-}
    (($#)) && shift
    case $cmd in
    start) cmd_start "$@" ;;
    stop) cmd_stop ;;
    status) cmd_status ;;
    -h | --help | help) usage ;;
    *)
        usage >&2
        exit 2
        ;;
    esac
}

main "$@"
