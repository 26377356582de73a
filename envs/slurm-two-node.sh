#!/usr/bin/env bash
# slurm-two-node.sh - a two-node Slurm cluster on this one machine, beside the
# one-node cluster of envs/slurm-local.sh: one slurmctld (host orch-ctl) and three
# slurmd (hosts orch-n1, orch-n2, orch-n3), each in its own network and UTS namespace,
# joined by a bridge this script creates, and a login host (orch-login, no daemon)
# that envs/karolina-sim.sh runs a simulated Karolina's login shells in. Besides
# its own partition `two` (all three nodes), it has Karolina's (qgpu, qgpu_exp, qgpu_preempt,
# qgpu_big; orch-n1 and orch-n2 only), with their limits and preemption. The filesystem is shared; inside the
# namespaces only /etc/hosts differs (/etc/netns/NAME/hosts is bound over it),
# so node names resolve to the namespaces' addresses. munged is the one envs/slurm-local.sh starts (started here too
# when it is missing). Needs root on Debian 12.
#
#   bash envs/slurm-two-node.sh        # install if missing, (re)configure, start,
#                                      # and return once the nodes are idle
#   bash envs/slurm-two-node.sh stop   # stop its daemons, remove its network
#
# Slurm commands reach this cluster with SLURM_CONF=/etc/slurm-two-node/slurm.conf
# (jobs inherit it from sbatch); without it they reach the one-node cluster.
# Idempotent: if everything already runs with the same config, it only checks the
# nodes and returns. Logs: /var/log/slurm-two-node/{slurmctld,slurmd-orch-n1,slurmd-orch-n2,slurmd-orch-n3}.log.
# Env: SLURM_TWO_NODE_WAIT_S (default 60) bounds the wait for the nodes;
# SLURM_TWO_NODE_NET (default 10.77.0) is the /24 the bridge and namespaces use.
set -euo pipefail

CONF=/etc/slurm-two-node/slurm.conf
LOGDIR=/var/log/slurm-two-node
SPOOL=/var/spool/slurm-two-node
RUNDIR=/run/slurm-two-node
WAIT_S=${SLURM_TWO_NODE_WAIT_S:-60}
NET=${SLURM_TWO_NODE_NET:-10.77.0}
BRIDGE=orch-br
CTL=orch-ctl
NODES=(orch-n1 orch-n2 orch-n3)
LOGIN=orch-login
declare -A ADDR=([$CTL]=$NET.10 [orch-n1]=$NET.11 [orch-n2]=$NET.12 [$LOGIN]=$NET.13 [orch-n3]=$NET.14)
TAG=slurm-two-node
LOGS=("$LOGDIR/slurmctld.log" "$LOGDIR/slurmd-orch-n1.log" "$LOGDIR/slurmd-orch-n2.log" "$LOGDIR/slurmd-orch-n3.log")
export SLURM_CONF=$CONF
# shellcheck source=envs/slurm-common.sh
source "$(dirname "$0")/slurm-common.sh"

# The daemon each namespace runs, and its pid file.
daemon_of() { if [[ $1 == "$CTL" ]]; then echo slurmctld; else echo slurmd; fi; }
pidfile_of() { if [[ $1 == "$CTL" ]]; then echo "$RUNDIR/slurmctld.pid"; else echo "$RUNDIR/slurmd-$1.pid"; fi; }
pid_in() { daemon_pid "$(daemon_of "$1")" "$(pidfile_of "$1")"; }

# Stop the daemon of each named namespace (if it runs).
stop_in() {
  local ns
  # shellcheck disable=SC2046 # pids, one word each
  stop_pids $(for ns in "$@"; do pid_in "$ns" || true; done)
}

# Whether a namespace has its address, and its veth is up on the bridge.
ns_complete() {
  ip -n "$1" -br addr show dev "p-$1" 2>/dev/null | grep -q " ${ADDR[$1]}/24" &&
    ip link show "v-$1" 2>/dev/null | grep -q "master $BRIDGE state UP"
}

# Remove a namespace and its veth (deleting the namespace alone may leave the host end behind).
ns_down() {
  ip netns del "$1" 2>/dev/null || true
  ip link del "v-$1" 2>/dev/null || true
}

# A namespace with a veth to the bridge and its address, and no route anywhere else; a daemon still in an older
# one is stopped, to be started in this one.
ns_up() {
  ns_complete "$1" && return 0
  log "creating network namespace $1 (${ADDR[$1]})"
  stop_in "$1"
  ns_down "$1"
  ip netns add "$1"
  ip link add "v-$1" type veth peer name "p-$1"
  ip link set "p-$1" netns "$1"
  ip link set "v-$1" master "$BRIDGE" up
  ip -n "$1" addr add "${ADDR[$1]}/24" dev "p-$1"
  ip -n "$1" link set "p-$1" up
  ip -n "$1" link set lo up
}

# The bridge; its address is how Slurm commands in this (the root) namespace reach slurmctld.
bridge_up() {
  ip link show "$BRIDGE" >/dev/null 2>&1 || ip link add "$BRIDGE" type bridge
  ip -br addr show dev "$BRIDGE" | grep -q " $NET.1/24" || ip addr add "$NET.1/24" dev "$BRIDGE"
  ip link set "$BRIDGE" up
}

# /etc/hosts inside every namespace: submitit's rendezvous address is the first node's name.
hosts_files() {
  local ns
  for ns in "$CTL" "${NODES[@]}" "$LOGIN"; do
    install -d "/etc/netns/$ns"
    printf '127.0.0.1 localhost\n%s %s\n%s %s\n%s %s\n%s %s\n%s %s login1\n' "${ADDR[$CTL]}" "$CTL" \
      "${ADDR[orch-n1]}" orch-n1 "${ADDR[orch-n2]}" orch-n2 "${ADDR[orch-n3]}" orch-n3 \
      "${ADDR[$LOGIN]}" "$LOGIN" >"/etc/netns/$ns/hosts"
  done
}

# Start a namespace's daemon under the namespace's hostname, with the namespaces' hosts file bound over /etc/hosts
# in a mount namespace of its own (`ip netns exec` would also remount /sys, hiding the cgroup mounts slurmd needs).
start_in() {
  log "starting $(daemon_of "$1") on $1"
  # shellcheck disable=SC2016 # expanded by the inner shell
  nsenter --net="/run/netns/$1" unshare --mount --propagation slave --uts \
    sh -c 'mount --bind "/etc/netns/$1/hosts" /etc/hosts && hostname "$1" && exec "$2"' sh "$1" "$(daemon_of "$1")" ||
    die "$(daemon_of "$1") on $1 failed to start"
}

if [[ ${1:-start} == stop ]]; then
  stop_in "$CTL" "${NODES[@]}"
  for ns in "$CTL" "${NODES[@]}" "$LOGIN"; do ns_down "$ns" && rm -rf "/etc/netns/$ns"; done
  ip link del "$BRIDGE" 2>/dev/null || true
  log "stopped slurmctld and the slurmd, removed their namespaces and bridge (munged keeps running)"
  exit 0
fi
[[ ${1:-start} == start ]] || { echo "usage: $0 [start|stop]" >&2; exit 2; }
[[ $(id -u) == 0 ]] || { echo "must run as root" >&2; exit 1; }

install_packages
start_munge

# Each node gets the machine's cores (jobs oversubscribe them, as on the one-node cluster) and half its memory.
hw=$(node_hardware 47)
install -d -m 0755 "$LOGDIR" "$SPOOL/slurmctld" "$SPOOL/orch-n1" "$SPOOL/orch-n2" "$SPOOL/orch-n3" "$RUNDIR" "$(dirname "$CONF")"
new=$(cat <<EOF
# Generated by envs/slurm-two-node.sh - local multi-node cluster. Do not edit.
ClusterName=twonode
SlurmctldHost=$CTL(${ADDR[$CTL]})
SlurmctldPort=6827
SlurmdPort=6828
StateSaveLocation=$SPOOL/slurmctld
SlurmdSpoolDir=$SPOOL/%n
SlurmctldPidFile=$RUNDIR/slurmctld.pid
SlurmdPidFile=$RUNDIR/slurmd-%n.pid
SlurmctldLogFile=$LOGDIR/slurmctld.log
SlurmdLogFile=$LOGDIR/slurmd-%n.log
$(shared_settings)
PreemptType=preempt/partition_prio
PreemptMode=REQUEUE
NodeName=orch-n1 NodeAddr=${ADDR[orch-n1]} $hw State=UNKNOWN
NodeName=orch-n2 NodeAddr=${ADDR[orch-n2]} $hw State=UNKNOWN
NodeName=orch-n3 NodeAddr=${ADDR[orch-n3]} $hw State=UNKNOWN
PartitionName=two Nodes=orch-n[1-3] Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:4 PreemptMode=OFF
# Karolina's GPU partitions, with its limits (MaxTime, MaxNodes, MinNodes) and preemption: a job of a higher
# PriorityTier that needs the nodes requeues qgpu_preempt's jobs after GraceTime. Cores are not shared here, so
# that a job asking for whole nodes (--exclusive) preempts.
PartitionName=qgpu Nodes=orch-n[1-2] MaxTime=2-00:00:00 MaxNodes=16 PriorityTier=2 PreemptMode=OFF State=UP
PartitionName=qgpu_exp Nodes=orch-n[1-2] MaxTime=01:00:00 MaxNodes=8 PriorityTier=2 PreemptMode=OFF State=UP
PartitionName=qgpu_preempt Nodes=orch-n[1-2] MaxTime=2-00:00:00 PriorityTier=1 PreemptMode=REQUEUE GraceTime=60 State=UP
PartitionName=qgpu_big Nodes=orch-n[1-2] MaxTime=2-00:00:00 MinNodes=2 PriorityTier=1 PreemptMode=OFF State=UP
EOF
)
if [[ ! -f $CONF ]] || [[ $(cat "$CONF") != "$new" ]]; then
  log "writing $CONF"
  printf '%s\n' "$new" >"$CONF"
  log "(re)starting the daemons with it"
  stop_in "$CTL" "${NODES[@]}"
fi

bridge_up
for ns in "$CTL" "${NODES[@]}" "$LOGIN"; do ns_up "$ns"; done
hosts_files
for ns in "$CTL" "${NODES[@]}"; do pid_in "$ns" >/dev/null || start_in "$ns"; done
wait_ready "$WAIT_S" "${NODES[@]}"
