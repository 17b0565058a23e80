#!/bin/bash
# A one-node Slurm cluster in a folder, for the tests (tests/slurm_fixture.py) or by hand:
#
#   tests/slurm_cluster.sh start DIR   # munged, slurmctld, slurmd; prints `export SLURM_CONF=DIR/slurm.conf`
#   tests/slurm_cluster.sh stop DIR    # stops the daemons it started (their pid files in DIR), nothing else
#
# Needs root and Debian's slurm-wlm + munge. Nothing system-wide is configured: slurm.conf, state,
# spool and logs live in DIR, and the Slurm commands find the cluster through SLURM_CONF. munged
# runs as the munge user on a socket in /run/munge/zagreus.* (its key: /etc/munge/munge.key, created if missing).
# The node is this machine ($(hostname -s)) with CPUs=$(nproc); the ports are picked free.
set -euo pipefail

action=${1:?usage: $0 start|stop DIR}
dir=$(realpath -m "${2:?usage: $0 start|stop DIR}")

free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

stop_pid() {  # stop_pid PIDFILE NAME: TERM, then KILL after 10 s, only if the pid is still that daemon
  local file=$1 name=$2 pid
  [ -s "$file" ] || return 0
  pid=$(cat "$file")
  if [ -r "/proc/$pid/comm" ] && [ "$(cat "/proc/$pid/comm")" = "$name" ]; then
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$pid" 2>/dev/null || true
  fi
  rm -f "$file"
}

case "$action" in
stop)
  # Jobs still running are ended with the node's daemon (their processes are slurmstepd's children).
  stop_pid "$dir/run/slurmd.pid" slurmd
  stop_pid "$dir/run/slurmctld.pid" slurmctld
  if [ -s "$dir/munge.dir" ]; then
    munge_dir=$(cat "$dir/munge.dir")
    stop_pid "$munge_dir/munged.pid" munged
    case "$munge_dir" in /run/munge/zagreus.*) rm -rf "$munge_dir" ;; esac
    rm -f "$dir/munge.dir"
  fi
  exit 0
  ;;
start) ;;
*) echo "usage: $0 start|stop DIR" >&2; exit 2 ;;
esac

[ "$(id -u)" = 0 ] || { echo "slurm_cluster.sh: must run as root (slurmctld and slurmd)" >&2; exit 3; }
for exe in munged slurmctld slurmd sinfo; do
  command -v "$exe" >/dev/null || [ -x "/usr/sbin/$exe" ] || { echo "slurm_cluster.sh: $exe not installed" >&2; exit 3; }
done
export PATH="$PATH:/usr/sbin"

host=$(hostname -s)
cpus=$(nproc)
mem_mb=$(awk '/MemTotal/ {print int($2 / 1024 * 0.9)}' /proc/meminfo)
mkdir -p "$dir"/{state,spool,log,run}

# munge: the key and the folders the package expects, owned by munge.
install -d -o munge -g munge -m 0700 /etc/munge /var/lib/munge /var/log/munge
install -d -o munge -g munge -m 0755 /run/munge
if [ ! -s /etc/munge/munge.key ]; then
  if command -v mungekey >/dev/null || [ -x /usr/sbin/mungekey ]; then
    mungekey --create --keyfile=/etc/munge/munge.key
  else
    dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none
  fi
  chown munge:munge /etc/munge/munge.key
  chmod 0400 /etc/munge/munge.key
fi
# The munge user must reach its files: a folder of ours under /run/munge (DIR may be private to root).
munge_dir=$(runuser -u munge -- mktemp -d /run/munge/zagreus.XXXXXX)
chmod 0755 "$munge_dir"
echo "$munge_dir" > "$dir/munge.dir"
socket="$munge_dir/munge.socket"
runuser -u munge -- munged --socket="$socket" --pid-file="$munge_dir/munged.pid" \
  --log-file="$munge_dir/munged.log" --seed-file="$munge_dir/munged.seed"

ctld_port=$(free_port)
slurmd_port=$(free_port)
while [ "$slurmd_port" = "$ctld_port" ]; do slurmd_port=$(free_port); done

cat > "$dir/slurm.conf" <<EOF
# Written by tests/slurm_cluster.sh: a one-node cluster for the tests.
ClusterName=zagreus-test
SlurmctldHost=$host
SlurmctldPort=$ctld_port
SlurmdPort=$slurmd_port
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket=$socket
CredType=cred/munge
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/run/slurmctld.pid
SlurmdPidFile=$dir/run/slurmd.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
ReturnToService=2
MpiDefault=none
# No slurmdbd: finished jobs go to a text file (sacct reads it) and stay in squeue/scontrol for a while.
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/filetxt
JobCompLoc=$dir/log/jobcomp.txt
MinJobAge=600
# Fast turnarounds for the tests: requeued jobs may start again at once.
SchedulerParameters=bf_interval=1,sched_min_interval=100000
KillWait=30
MessageTimeout=20
NodeName=$host CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
EOF

export SLURM_CONF="$dir/slurm.conf"
slurmctld -f "$SLURM_CONF"
slurmd -f "$SLURM_CONF"

for _ in $(seq 300); do
  state=$(sinfo -h -N -o '%T' 2>/dev/null | head -n 1 || true)
  [ "$state" = idle ] && { echo "export SLURM_CONF=$SLURM_CONF"; exit 0; }
  sleep 0.1
done
echo "slurm_cluster.sh: the node is not idle after 30 s (state: ${state:-none}); logs in $dir/log" >&2
tail -n 20 "$dir/log/slurmctld.log" "$dir/log/slurmd.log" >&2 || true
exit 1
