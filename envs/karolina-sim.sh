#!/usr/bin/env bash
# karolina-sim.sh - a simulated Karolina on this machine, on which the README's "Running on Karolina" commands run
# (tests/test_karolina_rehearsal.py; docs/karolina-sim.md):
#   - /scratch on a filesystem of its own (tmpfs), with the project folder /scratch/project/open-00-00;
#   - Slurm: the two-node cluster of envs/slurm-two-node.sh, whose partitions include Karolina's qgpu, qgpu_exp,
#     qgpu_preempt (preempted by the others, with a GraceTime) and qgpu_big;
#   - a login host (network and UTS namespace orch-login, hostname login1) apart from the compute hosts, with a
#     $HOME of its own;
#   - Lmod, with modules of the names envs/karolina.sh loads (envs/karolina-modules.sh).
# Needs root on Debian 12. Idempotent.
#
#   bash envs/karolina-sim.sh                    # set up, return once the nodes are idle
#   bash envs/karolina-sim.sh login 'COMMANDS'   # COMMANDS in a new login shell on the login host
#   bash envs/karolina-sim.sh online 'COMMANDS'  # the same, but in this machine's network namespace
#
# A login shell starts from a clean environment, as SSH gives one; it keeps this machine's package settings
# (PIP_CONFIG_FILE, PIP_FIND_LINKS, UV_CACHE_DIR, the TLS certificates) and SLURM_CONF, the site's Slurm. Karolina's login nodes reach the
# internet; the login host here reaches only the cluster's bridge, so what downloads packages (building the
# environment) runs `online`: the same shell, files and home, in the network namespace that reaches the registry.
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
SCRATCH=/scratch
PROJECT=$SCRATCH/project/open-00-00
SIM_HOME=/var/lib/karolina-sim/home
LOGIN=orch-login
CONF=/etc/slurm-two-node/slurm.conf

login() {  # $1: the commands; $2: the network namespace (the login host's, or none: this machine's)
  local pass=(HOME="$SIM_HOME" USER=root LOGNAME=root PATH=/usr/local/bin:/usr/bin:/bin SLURM_CONF="$CONF"
    TERM="${TERM:-dumb}" LANG=C.UTF-8)
  local name
  for name in PIP_CONFIG_FILE PIP_FIND_LINKS PIP_CERT UV_CACHE_DIR SSL_CERT_FILE SSL_CERT_DIR REQUESTS_CA_BUNDLE; do
    [[ -n ${!name:-} ]] && pass+=("$name=${!name}")
  done
  [[ -z ${PIP_CONFIG_FILE:-} && -f $HOME/.config/pip/pip.conf ]] && pass+=("PIP_CONFIG_FILE=$HOME/.config/pip/pip.conf")
  [[ -z ${UV_CACHE_DIR:-} && -d $HOME/.cache/uv ]] && pass+=("UV_CACHE_DIR=$HOME/.cache/uv")
  local net=(nsenter --net="/run/netns/$LOGIN")
  [[ -n ${2:-} ]] || net=()
  # shellcheck disable=SC2016 # expanded by the inner shell
  exec "${net[@]}" unshare --mount --propagation slave --uts \
    sh -c 'mount --bind "/etc/netns/$1/hosts" /etc/hosts && hostname login1 && cd "$2" && shift 2 && exec env -i "$@"' \
    sh "$LOGIN" "$SIM_HOME" "${pass[@]}" bash -l -c "$1"
}

if [[ ${1:-start} == login || ${1:-start} == online ]]; then
  [[ $# == 2 ]] || { echo "usage: $0 login|online 'COMMANDS'" >&2; exit 2; }
  if [[ $1 == login ]]; then login "$2" "$LOGIN"; else login "$2" ""; fi
fi
[[ ${1:-start} == start ]] || { echo "usage: $0 [start | login|online 'COMMANDS']" >&2; exit 2; }
[[ $(id -u) == 0 ]] || { echo "must run as root" >&2; exit 1; }

# tmux keeps `orch ui` running on the login host; socat stands in for the SSH tunnel to it.
for tool in tmux socat; do
  command -v "$tool" >/dev/null || DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$tool" >/dev/null ||
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$tool" >/dev/null; }
done
# Scratch first: the node daemons' mount namespaces copy the mounts that exist when they start.
install -d "$SCRATCH"
if ! mountpoint -q "$SCRATCH"; then
  mount -t tmpfs -o size=8g,mode=0755 karolina-scratch "$SCRATCH"
  echo "[karolina-sim] mounted a tmpfs on $SCRATCH"
fi
install -d "$PROJECT" "$SIM_HOME"
bash "$HERE/slurm-two-node.sh"
for pidfile in /run/slurm-two-node/slurmd-*.pid; do  # daemons started before the mount do not see it
  if ! nsenter -t "$(cat "$pidfile")" -m mountpoint -q "$SCRATCH"; then
    echo "[karolina-sim] the node daemons started before $SCRATCH was mounted: restarting the cluster"
    bash "$HERE/slurm-two-node.sh" stop
    bash "$HERE/slurm-two-node.sh"
    break
  fi
done
bash "$HERE/karolina-modules.sh"
echo "[karolina-sim] ready: scratch $PROJECT, login host $LOGIN (login1), home $SIM_HOME"
