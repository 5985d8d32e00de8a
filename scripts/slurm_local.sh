#!/usr/bin/env bash
# A real single-node SLURM cluster on this machine, for tests and CI (submitit / Hydra sweeps).
#
#   bash scripts/slurm_local.sh up       # install if missing, configure, start, wait until the node is idle
#   bash scripts/slurm_local.sh status   # daemons and node state; exit 0 only when jobs can run
#   bash scripts/slurm_local.sh down     # stop slurmd, slurmctld, munged by their pid files
#
# Runs as root. Idempotent: `up` on a running cluster only checks it. The configuration follows
# /work/shared/ENVIRONMENT.md §SLURM (Slurm 22.05 from Debian 12, no accounting storage). Because there
# is no accounting, the real `sacct` fails; `up` then installs scripts/sacct (answers from
# `scontrol show job -o`) as /usr/local/bin/sacct so submitit sees real job states.
# Jobs inherit the submitter's environment (sbatch's default --export=ALL), so submitit's
# sys.executable (the venv python) and HF_HUB_OFFLINE reach the job unchanged.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
CONF_DIR=/etc/slurm
CONF="$CONF_DIR/slurm.conf"
CTLD_PID=/run/slurmctld.pid
SLURMD_PID=/run/slurmd.pid
MUNGE_PID=/run/munge/munged.pid
SACCT_STANDIN=/usr/local/bin/sacct
PACKAGES=(slurmctld slurmd slurm-client munge)
WAIT_IDLE_S=60

log() { echo "[slurm_local] $*" >&2; }
die() { log "ERROR: $*"; exit 1; }

need_root() {
    [ "$(id -u)" -eq 0 ] || die "must run as root (it starts munged, slurmctld and slurmd); try: sudo bash $0 $1"
}

install_packages() {
    local missing=0 cmd
    for cmd in sinfo sbatch srun scontrol slurmctld slurmd munged mungekey; do
        command -v "$cmd" >/dev/null 2>&1 || missing=1
    done
    if [ "$missing" -eq 0 ]; then
        return
    fi
    log "installing ${PACKAGES[*]} with apt-get"
    apt-get update -qq
    # The packages try to start their services and are denied in containers; that is harmless.
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${PACKAGES[@]}" >/dev/null
}

pid_alive() {  # pid_alive PIDFILE -> 0 when the process named in PIDFILE runs
    [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null
}

write_conf() {
    local host cpus mem_mb conf_text
    host="$(hostname -s)"
    cpus="$(nproc)"
    # MemTotal is in kB; slurmd measures the same number, so the node is not drained for low memory.
    mem_mb="$(awk '/^MemTotal:/ {print int($2 / 1024)}' /proc/meminfo)"
    conf_text="# Written by scripts/slurm_local.sh (single-node test cluster); edits are overwritten.
ClusterName=local
SlurmctldHost=${host}(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
# Keep finished jobs in slurmctld for an hour (default 300 s) so the sacct stand-in can still
# report COMPLETED/FAILED for them; there is no accounting database to ask instead.
MinJobAge=3600
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=${CTLD_PID}
SlurmdPidFile=${SLURMD_PID}
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
SlurmctldPort=6817
SlurmdPort=6818
NodeName=${host} NodeAddr=127.0.0.1 CPUs=${cpus} RealMemory=${mem_mb} State=UNKNOWN
PartitionName=debug Nodes=${host} Default=YES MaxTime=INFINITE State=UP"
    mkdir -p "$CONF_DIR" /var/spool/slurmctld /var/spool/slurmd /var/log/slurm
    if [ ! -f "$CONF" ] || [ "$(cat "$CONF")" != "$conf_text" ]; then
        if pid_alive "$CTLD_PID" || pid_alive "$SLURMD_PID"; then
            log "slurm.conf changed while daemons run; restarting them"
            stop_daemons
        fi
        printf '%s\n' "$conf_text" > "$CONF"
        log "wrote $CONF (node ${host}, CPUs=${cpus}, RealMemory=${mem_mb} MB)"
    fi
}

start_munge() {
    mkdir -p /run/munge /var/log/munge /var/lib/munge
    chown munge:munge /run/munge /var/log/munge /var/lib/munge
    chmod 0755 /run/munge
    if [ ! -s /etc/munge/munge.key ]; then
        log "creating /etc/munge/munge.key"
        mkdir -p /etc/munge
        mungekey --create --keyfile=/etc/munge/munge.key --force
        chown munge:munge /etc/munge/munge.key
        chmod 0400 /etc/munge/munge.key
    fi
    if ! pid_alive "$MUNGE_PID"; then
        runuser -u munge -- /usr/sbin/munged
    fi
    munge -n | unmunge >/dev/null || die "munge does not round-trip a credential; see /var/log/munge/munged.log"
}

start_slurm() {
    if ! pid_alive "$CTLD_PID"; then
        slurmctld
    fi
    if ! pid_alive "$SLURMD_PID"; then
        slurmd
    fi
}

node_state() {
    sinfo -h -o %T 2>/dev/null | head -n 1 || true
}

wait_idle() {
    local i state=""
    for ((i = 0; i < WAIT_IDLE_S * 2; i++)); do
        state="$(node_state)"
        case "$state" in
            idle | mixed | allocated | completing) return 0 ;;
            # A node left down/drained by an earlier run (e.g. after a hard stop) is put back.
            down* | drain* | drained*)
                scontrol update nodename="$(hostname -s)" state=resume 2>/dev/null || true ;;
        esac
        sleep 0.5
    done
    log "node state is '${state:-none}' after ${WAIT_IDLE_S}s; last log lines:"
    tail -n 20 /var/log/slurm/slurmctld.log /var/log/slurm/slurmd.log >&2 || true
    die "SLURM node did not become idle"
}

install_sacct_standin() {
    # A real sacct (with slurmdbd) wins; our stand-in only fills in when sacct cannot answer.
    local real
    real="$(type -ap sacct | grep -vx "$SACCT_STANDIN" | head -n 1 || true)"
    if [ -n "$real" ] && "$real" -n -X -j 1 >/dev/null 2>&1; then
        log "real sacct works ($real); not installing the stand-in"
        return
    fi
    if ! cmp -s "$HERE/sacct" "$SACCT_STANDIN"; then
        install -m 0755 "$HERE/sacct" "$SACCT_STANDIN"
        log "installed sacct stand-in to $SACCT_STANDIN"
    fi
}

stop_one() {  # stop_one NAME PIDFILE
    local pid i
    pid_alive "$2" || { rm -f "$2"; return 0; }
    pid="$(cat "$2")"
    kill "$pid"
    for ((i = 0; i < 40; i++)); do
        kill -0 "$pid" 2>/dev/null || { rm -f "$2"; log "stopped $1 (pid $pid)"; return 0; }
        sleep 0.25
    done
    log "$1 (pid $pid) ignored SIGTERM for 10 s; sending SIGKILL"
    kill -9 "$pid" 2>/dev/null || true
    rm -f "$2"
}

stop_daemons() {
    stop_one slurmd "$SLURMD_PID"
    stop_one slurmctld "$CTLD_PID"
}

cmd_up() {
    local t0=$SECONDS
    need_root up
    install_packages
    write_conf
    start_munge
    start_slurm
    wait_idle
    install_sacct_standin
    log "up: node $(hostname -s) is $(node_state) ($((SECONDS - t0)) s)"
}

cmd_down() {
    need_root down
    stop_daemons
    stop_one munged "$MUNGE_PID"
}

cmd_status() {
    local name file ok=0 state
    for name in munged slurmctld slurmd; do
        case "$name" in
            munged) file="$MUNGE_PID" ;;
            slurmctld) file="$CTLD_PID" ;;
            slurmd) file="$SLURMD_PID" ;;
        esac
        if pid_alive "$file"; then
            echo "$name: running (pid $(cat "$file"))"
        else
            echo "$name: stopped"
            ok=1
        fi
    done
    if command -v sinfo >/dev/null 2>&1; then
        state="$(node_state)"
        echo "node: ${state:-unreachable}"
        case "$state" in idle | mixed | allocated | completing) ;; *) ok=1 ;; esac
    else
        echo "node: sinfo not installed"
        ok=1
    fi
    return "$ok"
}

case "${1:-}" in
    up) cmd_up ;;
    down) cmd_down ;;
    status) cmd_status ;;
    *) echo "usage: bash $0 up|down|status" >&2; exit 2 ;;
esac
