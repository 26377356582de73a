# shellcheck shell=bash
# slurm-common.sh - sourced (not run) by envs/slurm-local.sh and envs/slurm-two-node.sh: the packages, the
# shared munged, the settings both slurm.conf files carry, and daemon checks by pid file, so that each script
# starts, stops and waits for its own cluster's daemons only. The sourcing script sets TAG (its log prefix)
# and LOGS (an array of the log files an error shows the end of).

log() { echo "[$TAG] $*"; }
die() {
  local f
  echo "[$TAG] ERROR: $*" >&2
  for f in "${LOGS[@]}"; do
    [[ -f $f ]] && { echo "--- tail $f" >&2; tail -n 25 "$f" >&2; }
  done
  sinfo -R >&2 2>/dev/null || true
  exit 1
}

# Is this process alive (not a zombie)?
live() { ps -p "$1" -o stat= 2>/dev/null | grep -qv '^Z'; }

# The pid in a daemon's pid file, when that process is alive and has the daemon's name (not a reused pid).
daemon_pid() {
  local pid
  pid=$(cat "$2" 2>/dev/null) || return 1
  [[ $pid =~ ^[0-9]+$ && $(ps -p "$pid" -o comm= 2>/dev/null) == "$1" ]] && live "$pid" && echo "$pid"
}

# Send SIGTERM to these processes and wait (up to 15 s) until they are gone, then SIGKILL.
stop_pids() {
  local pid
  (($#)) || return 0
  kill "$@" 2>/dev/null || true
  for _ in $(seq 30); do
    for pid in "$@"; do live "$pid" && { sleep 0.5; continue 2; }; done
    return 0
  done
  kill -9 "$@" 2>/dev/null || true
}

munge_ok() { timeout 5 bash -c 'munge -n | unmunge' >/dev/null 2>&1; }

# Debian's Slurm and munge, installed only where missing (apt-get update only then).
install_packages() {
  local p missing=()
  for p in slurmctld slurmd slurm-client munge; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'ok installed' || missing+=("$p")
  done
  ((${#missing[@]})) || return 0
  log "installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  if [[ ! -e /usr/sbin/policy-rc.d ]]; then # keep postinst from starting daemons
    printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d
    trap 'rm -f /usr/sbin/policy-rc.d' EXIT
  fi
  apt-get update -q
  apt-get install -y -q --no-install-recommends "${missing[@]}"
}

# Munge: key, runtime dir, and the one munged every local cluster authenticates with.
start_munge() {
  install -d -o munge -g munge -m 0700 /etc/munge /var/lib/munge /var/log/munge
  install -d -o munge -g munge -m 0755 /run/munge
  if [[ ! -s /etc/munge/munge.key ]]; then
    log "creating /etc/munge/munge.key"
    (umask 077 && dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none)
  fi
  chown munge:munge /etc/munge/munge.key
  chmod 0400 /etc/munge/munge.key
  munge_ok && return 0
  log "starting munged"
  # shellcheck disable=SC2046 # a hung or half-dead one
  stop_pids $(pgrep -x munged)
  runuser -u munge -- /usr/sbin/munged
  for _ in $(seq 20); do munge_ok && break; sleep 0.5; done
  munge_ok || die "munge does not work (see /var/log/munge/munged.log)"
}

# The hardware fields of a NodeName line for this machine, with $1 percent of the memory `slurmd -C` detects.
# Using its topology (and less memory than detected: free memory may shrink a bit between boots) keeps a node
# from being drained for "Low RealMemory"/"Low socket*core*thread count".
node_hardware() {
  local hw mem field fields=
  hw=$(slurmd -C 2>&1 | head -n1)
  mem=$(sed -n 's/.*\bRealMemory=\([0-9]*\).*/\1/p' <<<"$hw")
  [[ -n $mem ]] || die "slurmd -C failed: '$hw'"
  for field in CPUs Boards SocketsPerBoard CoresPerSocket ThreadsPerCore; do
    fields+="$field=$(sed -n "s/.*\b$field=\([0-9]*\).*/\1/p" <<<"$hw") "
  done
  echo "${fields}RealMemory=$((mem * $1 / 100))"
}

# slurm.conf settings both local clusters share (the rest names each one's host, ports, paths and nodes).
shared_settings() {
  cat <<'EOF'
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
# cred_expire is also the delay before a requeued job may start again (default 120 s).
AuthInfo=cred_expire=5
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SwitchType=switch/none
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
SchedulerType=sched/backfill
# Re-test pending jobs every few seconds (defaults 60/30 s) so requeued jobs restart fast.
SchedulerParameters=sched_interval=5,bf_interval=5
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
# A node that went DOWN for a reason of its own (not a lost contact) stays out until `scontrol update
# state=resume`, as a failed node on a cluster does (tests/test_slurm_chaos.py sets one down).
ReturnToService=1
JobRequeue=1
MinJobAge=300
KillWait=5
MailProg=/bin/true
# Kill srun/salloc allocations whose client vanished (0 = never).
InactiveLimit=60
SlurmdTimeout=60
SlurmctldTimeout=60
EOF
}

# Wait (up to $1 s) until every node named after it is usable; resume any that is down or drained (e.g. stale
# state from an earlier run).
wait_ready() {
  local wait_s=$1 node state deadline
  shift
  deadline=$((SECONDS + wait_s))
  for node in "$@"; do
    while :; do
      state=$(timeout 10 sinfo -h -n "$node" -o %T 2>/dev/null | head -n1 || true)
      case $state in
        idle | mixed | allocated | completing) # ready (busy states: jobs already running)
          log "node $node is $state ($(sinfo -h -n "$node" -o '%c CPUs, %m MB, partition %P'))"
          break ;;
        *down* | *drain* | *fail*)
          scontrol update nodename="$node" state=resume 2>/dev/null || true ;;
      esac
      ((SECONDS < deadline)) || die "node $node not ready after ${wait_s}s (state: '${state:-unknown}')"
      sleep 1
    done
  done
}
