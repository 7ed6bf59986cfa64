#!/usr/bin/env bash
# A one-node SLURM cluster on this machine, for the tests marked `slurm` (and for trying train.sbatch).
#
#   scripts/slurm/local_cluster.sh start    # install what is missing (root, Debian), start munge, slurmctld, slurmd
#   scripts/slurm/local_cluster.sh status   # sinfo
#   scripts/slurm/local_cluster.sh stop     # stop the daemons, cancel what is left
#
# The cluster's configuration and state live in $ZOO_SLURM_DIR (default /tmp/residual-zoo-slurm); commands
# find it through SLURM_CONF=$ZOO_SLURM_DIR/slurm.conf, which `start` prints. The machine's own
# /etc/slurm is never touched. One node (this host, no GPUs), one partition `debug`, JobRequeue=1, so jobs
# behave as on a real cluster: time limits, --signal, requeue, scancel. The node offers $ZOO_SLURM_CPUS CPU
# slots (default: the machine's CPUs, at least 8; slurmd's config_overrides lets it offer more than it
# has), so the tests' small jobs run side by side instead of waiting for each other.
set -euo pipefail
DIR=${ZOO_SLURM_DIR:-/tmp/residual-zoo-slurm}
CONF=$DIR/slurm.conf
export SLURM_CONF=$CONF

need_root() {
  if [[ $(id -u) -ne 0 ]]; then
    echo "local_cluster.sh: $1 needs root (the daemons run as root here); run it with sudo" >&2
    exit 2
  fi
}

install_missing() {
  local missing=()
  command -v slurmctld >/dev/null || missing+=(slurmctld)
  command -v slurmd >/dev/null || missing+=(slurmd)
  command -v sbatch >/dev/null || missing+=(slurm-client)
  command -v munged >/dev/null || missing+=(munge)
  if ((${#missing[@]})); then
    command -v apt-get >/dev/null || {
      echo "local_cluster.sh: ${missing[*]} missing and no apt-get to install them" >&2
      exit 2
    }
    echo "installing ${missing[*]}"
    apt-get update -q >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null
  fi
}

start_munge() {
  if munge -n </dev/null >/dev/null 2>&1; then return; fi # already running
  if [[ ! -s /etc/munge/munge.key ]]; then
    mkdir -p /etc/munge
    if command -v mungekey >/dev/null; then mungekey --create --force; else
      dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key status=none
    fi
  fi
  mkdir -p /run/munge /var/log/munge /var/lib/munge
  if id munge >/dev/null 2>&1; then
    chown munge:munge /etc/munge/munge.key /run/munge /var/log/munge /var/lib/munge
    chmod 0400 /etc/munge/munge.key
    runuser -u munge -- munged
  else
    chmod 0400 /etc/munge/munge.key
    munged --force
  fi
}

write_conf() {
  local host cpus mem
  host=$(hostname -s)
  cpus=${ZOO_SLURM_CPUS:-$(($(nproc --all) > 8 ? $(nproc --all) : 8))}
  mem=$(($(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 - 1024)) # MiB, leaving 1 GiB to the system
  mkdir -p "$DIR/ctld" "$DIR/d"
  cat >"$CONF" <<EOF
# Written by scripts/slurm/local_cluster.sh: a one-node cluster for the tests.
ClusterName=zoo
SlurmctldHost=$host(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
StateSaveLocation=$DIR/ctld
SlurmdSpoolDir=$DIR/d
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$DIR/slurmctld.log
SlurmdLogFile=$DIR/slurmd.log
SlurmctldPort=6817
SlurmdPort=6818
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SwitchType=switch/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
ReturnToService=2
SlurmdParameters=config_overrides
JobRequeue=1
KillWait=30
MinJobAge=600
InactiveLimit=0
NodeName=$host NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP
EOF
}

wait_idle() {
  for _ in $(seq 60); do
    if sinfo -h -o '%t' 2>/dev/null | grep -qE '^(idle|mix|alloc)'; then
      echo "SLURM is up: export SLURM_CONF=$CONF"
      sinfo
      return
    fi
    sleep 1
  done
  echo "local_cluster.sh: the node did not become idle in 60 s; see $DIR/slurmctld.log and $DIR/slurmd.log" >&2
  sinfo >&2 || true
  exit 1
}

stop() {
  if [[ -f $CONF ]]; then scancel --quiet --full --user "$(id -un)" 2>/dev/null || true; fi
  for daemon in slurmd slurmctld; do
    if [[ -f $DIR/$daemon.pid ]]; then kill "$(cat "$DIR/$daemon.pid")" 2>/dev/null || true; fi
  done
  for _ in $(seq 30); do
    pgrep -f "slurm(ctld|d) -f $CONF" >/dev/null || break
    sleep 1
  done
  pkill -9 -f "slurm(ctld|d) -f $CONF" 2>/dev/null || true
  rm -f "$DIR"/*.pid
}

case ${1:-} in
start)
  need_root start
  install_missing
  start_munge
  stop
  write_conf
  slurmctld -f "$CONF"
  slurmd -f "$CONF"
  wait_idle
  ;;
stop)
  stop
  echo "SLURM stopped"
  ;;
status)
  sinfo && squeue
  ;;
*)
  echo "usage: $0 start|stop|status" >&2
  exit 2
  ;;
esac
