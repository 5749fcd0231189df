#!/usr/bin/env bash
# Start a one-node SLURM cluster on this host, for `make test-slurm` (tests/test_slurm.py).
#
# Idempotent: installs slurm-wlm + munge when missing (needs root), writes a minimal slurm.conf for
# this node, starts munged (as user munge), slurmctld and slurmd when they are not running, then
# waits until `sinfo` shows the node idle. Exits non-zero with a message when it cannot.
# SLURM_UP_TIMEOUT (seconds, default 120) bounds the wait for the node.
set -euo pipefail

TIMEOUT="${SLURM_UP_TIMEOUT:-120}"
CONF_DIR=/etc/slurm
CONF="$CONF_DIR/slurm.conf"
LOG_DIR=/var/log/slurm

die() { echo "slurm_up: error: $*" >&2; exit 1; }
say() { echo "slurm_up: $*" >&2; }

install_packages() {
    if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v munged >/dev/null \
        && command -v sbatch >/dev/null; then
        return
    fi
    [ "$(id -u)" = 0 ] || die "slurm-wlm / munge are not installed and this is not root: run 'sudo apt-get install -y slurm-wlm munge' first"
    say "installing slurm-wlm and munge (apt, under flock /tmp/apt.lock)"
    export DEBIAN_FRONTEND=noninteractive
    flock /tmp/apt.lock apt-get update -qq || die "apt-get update failed"
    flock /tmp/apt.lock apt-get install -y -qq slurm-wlm munge >/dev/null \
        || die "apt-get install slurm-wlm munge failed (see the apt output above)"
}

write_conf() {
    local host cpus mem
    host="$(hostname -s)"
    cpus="$(nproc)"
    mem="$(awk '/MemTotal/ {print int($2 / 1024 * 0.9)}' /proc/meminfo)"
    mkdir -p "$CONF_DIR" "$LOG_DIR" /var/spool/slurmctld /var/spool/slurmd
    local tmp
    tmp="$(mktemp)"
    cat > "$tmp" <<CONF
# written by pcim scripts/slurm_up.sh: one node (this host), root runs the daemons
ClusterName=pcim
SlurmctldHost=$host
SlurmUser=root
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
ReturnToService=2
SlurmctldPort=6817
SlurmdPort=6818
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=$LOG_DIR/slurmctld.log
SlurmdLogFile=$LOG_DIR/slurmd.log
SlurmdTimeout=60
InactiveLimit=0
KillWait=10
MinJobAge=60
NodeName=$host NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
CONF
    if ! cmp -s "$tmp" "$CONF"; then
        say "writing $CONF (node $host, $cpus CPUs, ${mem} MB)"
        mv "$tmp" "$CONF"
        RECONFIGURED=1
    else
        rm -f "$tmp"
    fi
    # no cgroup.conf: slurmd 22.05 autodetects cgroups (v1 or v2) and works with proctrack/linuxproc;
    # "CgroupPlugin=disabled" exists only in newer releases and stops 22.05's slurmd from starting
}

running() { pgrep -x "$1" >/dev/null; }

start_munge() {
    if [ ! -s /etc/munge/munge.key ]; then
        say "creating /etc/munge/munge.key"
        if command -v mungekey >/dev/null; then mungekey --create --force >/dev/null; else
            dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none; fi
        chown munge:munge /etc/munge/munge.key && chmod 400 /etc/munge/munge.key
    fi
    mkdir -p /run/munge /var/log/munge /var/lib/munge
    chown munge:munge /run/munge /var/log/munge /var/lib/munge
    if ! running munged; then
        say "starting munged (user munge)"
        runuser -u munge -- /usr/sbin/munged || die "munged did not start: see /var/log/munge/munged.log"
    fi
    for _ in $(seq 20); do munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && return; sleep 0.5; done
    die "munge does not work (munge -n | unmunge fails): see /var/log/munge/munged.log"
}

start_slurm() {
    if [ "${RECONFIGURED:-0}" = 1 ]; then
        running slurmd && { say "config changed: restarting slurmd"; pkill -x slurmd || true; sleep 1; }
        running slurmctld && { say "config changed: restarting slurmctld"; pkill -x slurmctld || true; sleep 1; }
    fi
    if ! running slurmctld; then
        say "starting slurmctld"
        slurmctld || die "slurmctld did not start: see $LOG_DIR/slurmctld.log"
    fi
    if ! running slurmd; then
        say "starting slurmd"
        slurmd || die "slurmd did not start: see $LOG_DIR/slurmd.log"
    fi
}

wait_idle() {
    local host state waited=0
    host="$(hostname -s)"
    while [ "$waited" -lt "$TIMEOUT" ]; do
        state="$(sinfo -h -n "$host" -o %T 2>/dev/null | head -n1 || true)"
        case "$state" in
            idle|mixed|allocated) say "node $host is $state: sbatch and srun work"; return ;;
            down*|drain*|fail*) scontrol update NodeName="$host" State=RESUME >/dev/null 2>&1 || true ;;
        esac
        sleep 2; waited=$((waited + 2))
    done
    die "node $host is not idle after ${TIMEOUT}s (state: ${state:-unknown}); see $LOG_DIR/slurmctld.log and $LOG_DIR/slurmd.log"
}

RECONFIGURED=0
install_packages
write_conf
start_munge
start_slurm
wait_idle
