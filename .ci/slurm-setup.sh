#!/usr/bin/env bash
# Start a single-node SLURM "cluster" on this machine (localhost), for tests/test_slurm.py and CI.
#
#   .ci/slurm-setup.sh            install (Debian packages) if missing, configure, start, check
#   .ci/slurm-setup.sh --stop     stop the daemons this script started
#
# Debian/Ubuntu only (apt-get), needs root (or passwordless sudo). Works in containers without systemd or
# cgroups: the daemons are started directly, process tracking is proctrack/linuxproc, no task plugin.
# Accounting is off (no slurmdbd): `sacct` does not work here, job states are read with `squeue`, and
# MinJobAge keeps finished jobs visible to squeue for an hour. No GPUs are configured (no gres.conf).
#
# Idempotent: a second run with everything up and the same configuration only re-checks it. It refuses to
# overwrite a slurm.conf it did not write (a real cluster's), unless WSIPIPE_SLURM_FORCE=1.
#
# Environment: WSIPIPE_SLURM_MEM_HEADROOM_MB (default: max(1024, 10% of RAM)) memory kept out of SLURM.
set -euo pipefail

MARKER="# written by wsipipe .ci/slurm-setup.sh"
CONF_DIR=/etc/slurm
CONF=$CONF_DIR/slurm.conf
SPOOL=/var/spool/slurm
LOGDIR=/var/log/slurm
RUNDIR=/run/slurm
NODE=localhost
PARTITION=debug
PARTITION2=extra
DEADLINE=$((SECONDS + 150))

log() { echo "slurm-setup: $*" >&2; }
die() {
  echo "slurm-setup: ERROR: $*" >&2
  for f in "$LOGDIR/slurmctld.log" "$LOGDIR/slurmd.log"; do
    [ -r "$f" ] && { echo "--- last lines of $f" >&2; tail -n 15 "$f" >&2; }
  done
  exit 1
}

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null && sudo -n true 2>/dev/null; then SUDO="sudo -n"; else
    die "needs root (or passwordless sudo) to install and start SLURM"; fi
fi

pid_alive() { [ -r "$1" ] && $SUDO kill -0 "$(cat "$1")" 2>/dev/null; }

stop_daemon() {  # stop_daemon NAME PIDFILE: only the process recorded in our own pid file
  local name=$1 pidfile=$2 pid
  if pid_alive "$pidfile"; then
    pid=$(cat "$pidfile")
    log "stopping $name (pid $pid)"
    $SUDO kill "$pid" || true
    for _ in $(seq 50); do $SUDO kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
    $SUDO kill -0 "$pid" 2>/dev/null && { $SUDO kill -9 "$pid" || true; }
  fi
  $SUDO rm -f "$pidfile"
}

if [ "${1:-}" = "--stop" ]; then
  stop_daemon slurmd "$RUNDIR/slurmd.pid"
  stop_daemon slurmctld "$RUNDIR/slurmctld.pid"
  exit 0
fi

# ---- 1. packages ------------------------------------------------------------------------------------
missing=()
for pair in slurmctld:slurmctld slurmd:slurmd sinfo:slurm-client munged:munge; do
  command -v "${pair%%:*}" >/dev/null 2>&1 || [ -x "/usr/sbin/${pair%%:*}" ] || missing+=("${pair##*:}")
done
if [ ${#missing[@]} -gt 0 ]; then
  command -v apt-get >/dev/null || die "SLURM is not installed and there is no apt-get (install ${missing[*]} yourself)"
  log "installing ${missing[*]} (Debian packages)"
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -qq >/dev/null || die "apt-get update failed"
  $SUDO apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client munge >/dev/null \
    || die "apt-get install slurmctld slurmd slurm-client munge failed"
fi
PATH=/usr/sbin:/sbin:$PATH

# ---- 2. munge ---------------------------------------------------------------------------------------
MUNGE_USER=munge; id munge >/dev/null 2>&1 || MUNGE_USER=root
if [ ! -s /etc/munge/munge.key ]; then
  log "creating /etc/munge/munge.key"
  $SUDO mkdir -p /etc/munge
  if command -v mungekey >/dev/null; then $SUDO mungekey --create --force >/dev/null
  else $SUDO dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none; fi
  $SUDO chown "$MUNGE_USER": /etc/munge/munge.key && $SUDO chmod 400 /etc/munge/munge.key
fi
$SUDO mkdir -p /run/munge /var/lib/munge /var/log/munge
$SUDO chown "$MUNGE_USER": /run/munge /var/lib/munge /var/log/munge
if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
  log "starting munged"
  $SUDO rm -f /run/munge/munged.pid
  if [ "$MUNGE_USER" = root ]; then $SUDO munged --force; else $SUDO runuser -u munge -- munged --force; fi
  for _ in $(seq 50); do munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && break; sleep 0.2; done
  munge -n | unmunge >/dev/null || die "munged does not answer (munge -n | unmunge failed)"
fi

# ---- 3. slurm.conf ----------------------------------------------------------------------------------
CPUS=$(nproc)
TOTAL_MB=$(awk '/^MemTotal:/ {print int($2 / 1024)}' /proc/meminfo)
HEADROOM=${WSIPIPE_SLURM_MEM_HEADROOM_MB:-$(( TOTAL_MB / 10 > 1024 ? TOTAL_MB / 10 : 1024 ))}
MEM=$(( TOTAL_MB - HEADROOM ))
[ "$MEM" -ge 1024 ] || die "only ${TOTAL_MB} MB of memory (${HEADROOM} MB headroom): too little for a test cluster"
SLURM_USER=slurm; id slurm >/dev/null 2>&1 || SLURM_USER=root
HOST=$(hostname -s)

read -r -d '' NEWCONF <<EOF || true
$MARKER (single-node test cluster; do not use in production)
ClusterName=wsipipe
SlurmctldHost=$HOST(127.0.0.1)
SlurmUser=$SLURM_USER
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
SwitchType=switch/none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=1000
SlurmdParameters=config_overrides
ReturnToService=2
# no accounting: finished jobs stay visible to squeue (snakemake --slurm-status-command squeue) for 1 h
MinJobAge=3600
MaxJobCount=50000
KillWait=5
InactiveLimit=0
SlurmctldTimeout=60
SlurmdTimeout=120
StateSaveLocation=$SPOOL/ctld
SlurmdSpoolDir=$SPOOL/d
SlurmctldPidFile=$RUNDIR/slurmctld.pid
SlurmdPidFile=$RUNDIR/slurmd.pid
SlurmctldLogFile=$LOGDIR/slurmctld.log
SlurmdLogFile=$LOGDIR/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
NodeName=$NODE NodeHostname=$HOST NodeAddr=127.0.0.1 CPUs=$CPUS RealMemory=$MEM State=UNKNOWN
PartitionName=$PARTITION Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
# a second partition on the same node: tests check that WSIPIPE_SLURM_PARTITION reaches sbatch -p
PartitionName=$PARTITION2 Nodes=$NODE Default=NO MaxTime=INFINITE State=UP
EOF

if [ -e "$CONF" ] && ! grep -qF "$MARKER" "$CONF" && [ "${WSIPIPE_SLURM_FORCE:-0}" != 1 ]; then
  die "$CONF exists and was not written by this script (a real cluster?); not touching it (WSIPIPE_SLURM_FORCE=1 overrides)"
fi
changed=0
if [ ! -e "$CONF" ] || [ "$(cat "$CONF")" != "$NEWCONF" ]; then
  log "writing $CONF (node $NODE: $CPUS CPUs, $MEM MB; partitions $PARTITION, $PARTITION2)"
  $SUDO mkdir -p "$CONF_DIR"
  printf '%s\n' "$NEWCONF" | $SUDO tee "$CONF" >/dev/null
  changed=1
fi
$SUDO mkdir -p "$SPOOL/ctld" "$SPOOL/d" "$LOGDIR" "$RUNDIR"
$SUDO chown "$SLURM_USER": "$SPOOL/ctld" "$LOGDIR" "$RUNDIR"

# ---- 4. daemons -------------------------------------------------------------------------------------
if [ "$changed" = 1 ]; then
  stop_daemon slurmd "$RUNDIR/slurmd.pid"
  stop_daemon slurmctld "$RUNDIR/slurmctld.pid"
fi
if ! pid_alive "$RUNDIR/slurmctld.pid"; then
  log "starting slurmctld"
  $SUDO slurmctld || die "slurmctld did not start"
fi
for _ in $(seq 100); do scontrol ping 2>/dev/null | grep -q "UP" && break; sleep 0.3; done
scontrol ping 2>/dev/null | grep -q UP || die "slurmctld does not answer (scontrol ping)"
if ! pid_alive "$RUNDIR/slurmd.pid"; then
  log "starting slurmd"
  $SUDO slurmd -N "$NODE" || die "slurmd did not start"
fi

# ---- 5. wait for the node, then run a job step ------------------------------------------------------
state=""
while [ $SECONDS -lt $DEADLINE ]; do
  state=$(sinfo -h -N -n "$NODE" -o %t 2>/dev/null | head -n1 || true)
  case "$state" in
    idle|mix|alloc|comp) break ;;
    down*|drain*|drng*|fail*) $SUDO scontrol update NodeName="$NODE" State=RESUME 2>/dev/null || true ;;
  esac
  sleep 1
done
case "$state" in idle|mix|alloc|comp) ;; *) die "node $NODE is '${state:-unknown}', not idle (sinfo -R: $(sinfo -h -R 2>/dev/null))" ;; esac

out=$(timeout 60 srun -N1 -n1 -t 1 -p "$PARTITION" hostname 2>&1) || die "srun hostname failed: $out"
log "ready: partitions $PARTITION (default) and $PARTITION2, node $NODE ($state), srun ran on '$out'"
sinfo >&2
