#!/usr/bin/env bash
# A single-node SLURM cluster on 127.0.0.1 for trying (and testing) `hydra/launcher=submitit_slurm`.
#
#   scripts/slurm-local.sh install   # as root: apt-get install slurm-wlm munge (skipped when sbatch exists)
#   scripts/slurm-local.sh start     # as root: munged, slurmctld, slurmd with a private slurm.conf
#   eval "$(scripts/slurm-local.sh env)"   # SLURM_CONF and PATH (with the sacct stand-in) for clients
#   scripts/slurm-local.sh status
#   scripts/slurm-local.sh stop      # cancels its jobs, kills the daemons by their pid files
#
# Everything lives under $SLURM_LOCAL_DIR (default /tmp/linreg-slurm); nothing under /etc is changed
# except what the Debian packages install. Checked with Debian bookworm's Slurm 22.05 as root, no systemd.
set -euo pipefail

SCRIPTS="$(cd "$(dirname "$0")" && pwd)"
DIR="${SLURM_LOCAL_DIR:-/tmp/linreg-slurm}"
CONF="$DIR/slurm.conf"
NODE="$(hostname -s)"
# RealMemory (MB): without it the node has 1 MB and any --mem is rejected; above the real RAM the node drains.
MEM_MB="${SLURM_LOCAL_MEM_MB:-$(awk '/^MemTotal:/ {print int($2 / 1024 / 2)}' /proc/meminfo)}"
PIDS=(slurmd slurmctld munged)        # stop order: node daemon, controller, then authentication

say() { echo "slurm-local: $*" >&2; }

env_lines() {
	# The sacct stand-in goes first on PATH only for the cluster's users (submitit asks sacct for job states).
	echo "export SLURM_CONF=$CONF"
	echo "export PATH=$SCRIPTS:\$PATH"
}

cmd_install() {
	if command -v sbatch >/dev/null && command -v slurmctld >/dev/null && command -v munged >/dev/null; then
		say "slurm-wlm and munge already installed"
		return 0
	fi
	export DEBIAN_FRONTEND=noninteractive
	apt-get update -q
	apt-get install -y -q slurm-wlm munge
}

write_conf() {
	mkdir -p "$DIR"/{state,spool,log,run}
	chmod 0755 "$DIR"
	cat >"$CONF" <<EOF
# Written by scripts/slurm-local.sh: one node, this host, 127.0.0.1 only.
ClusterName=linreg-local
SlurmctldHost=$NODE(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$DIR/munge/socket
SlurmctldPort=${SLURM_LOCAL_PORT:-6817}
SlurmdPort=$((${SLURM_LOCAL_PORT:-6817} + 1))
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmdPidFile=$DIR/run/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
# No systemd/cgroups here: plain process tracking, no task binding, no accounting daemon.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
# Finished jobs stay visible to scontrol for an hour: the sacct stand-in reads their state there.
MinJobAge=3600
MailProg=/bin/true
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$(nproc) RealMemory=$MEM_MB State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
}

pid_alive() {
	local f="$DIR/run/$1.pid"
	[[ -s $f ]] && kill -0 "$(cat "$f")" 2>/dev/null
}

wait_for() { # wait_for SECONDS DESCRIPTION COMMAND...
	local secs=$1 what=$2
	shift 2
	local i
	for ((i = 0; i < secs * 10; i++)); do
		if "$@" >/dev/null 2>&1; then return 0; fi
		sleep 0.1
	done
	say "timed out waiting for $what (logs in $DIR/log)"
	return 1
}

node_idle() { [[ "$(SLURM_CONF=$CONF sinfo -h -o %t 2>/dev/null)" == idle ]]; }

start_munge() {
	if pid_alive munged; then return 0; fi
	if [[ ! -s /etc/munge/munge.key ]]; then
		# The package's post-install normally creates it; an image built without it needs one.
		mungekey --create --keyfile=/etc/munge/munge.key
		chown munge:munge /etc/munge/munge.key
		chmod 0400 /etc/munge/munge.key
	fi
	# A private socket (named in slurm.conf's AuthInfo), so a system munged is neither used nor disturbed.
	install -d -o munge -g munge -m 0755 "$DIR/munge"
	rm -f "$DIR/munge/munged.pid"
	runuser -u munge -- /usr/sbin/munged --socket="$DIR/munge/socket" --pid-file="$DIR/munge/munged.pid" \
		--log-file="$DIR/munge/munged.log" --seed-file="$DIR/munge/munged.seed"
	wait_for 10 "munged pid file" test -s "$DIR/munge/munged.pid"
	cp "$DIR/munge/munged.pid" "$DIR/run/munged.pid"
	wait_for 10 "munge credentials" bash -c "munge -S '$DIR/munge/socket' -n | unmunge -S '$DIR/munge/socket'"
}

cmd_start() {
	[[ $(id -u) == 0 ]] || {
		say "start needs root (slurmd runs jobs as their users)"
		exit 1
	}
	command -v slurmctld >/dev/null || {
		say "slurmctld not found: run '$0 install' first"
		exit 1
	}
	if pid_alive slurmctld && pid_alive slurmd && SLURM_CONF=$CONF scontrol ping >/dev/null 2>&1; then
		say "already running ($CONF)"
		env_lines
		return 0
	fi
	write_conf
	start_munge
	pid_alive slurmctld || SLURM_CONF=$CONF slurmctld -c -f "$CONF" # -c: a fresh queue, no jobs from an earlier run
	wait_for 20 "slurmctld (scontrol ping)" env SLURM_CONF="$CONF" scontrol ping
	pid_alive slurmd || SLURM_CONF=$CONF slurmd -f "$CONF" -N "$NODE"
	wait_for 30 "node $NODE idle" node_idle
	say "cluster up: node $NODE, partition debug, $(nproc) CPUs, ${MEM_MB} MB; run:"
	env_lines
}

cmd_stop() {
	local name pid i
	if pid_alive slurmctld; then
		# Jobs still running would outlive slurmd (their slurmstepd): cancel them first; the cluster is ours alone.
		SLURM_CONF=$CONF scancel --partition=debug 2>/dev/null || true
		wait_for 10 "jobs to end" bash -c "[[ -z \$(SLURM_CONF='$CONF' squeue -h -t R,CG,PD 2>/dev/null) ]]" || true
	fi
	for name in "${PIDS[@]}"; do
		pid_alive "$name" || {
			rm -f "$DIR/run/$name.pid"
			continue
		}
		pid=$(cat "$DIR/run/$name.pid")
		kill "$pid"
		for ((i = 0; i < 100; i++)); do
			kill -0 "$pid" 2>/dev/null || break
			sleep 0.1
		done
		if kill -0 "$pid" 2>/dev/null; then
			say "$name ($pid) ignored SIGTERM; sending SIGKILL"
			kill -9 "$pid" 2>/dev/null || true
		fi
		rm -f "$DIR/run/$name.pid"
		say "stopped $name ($pid)"
	done
}

cmd_status() {
	local name rc=0
	for name in "${PIDS[@]}"; do
		if pid_alive "$name"; then
			echo "$name: running (pid $(cat "$DIR/run/$name.pid"))"
		else
			echo "$name: stopped"
			rc=1
		fi
	done
	if SLURM_CONF=$CONF sinfo -h -o '%P %t %c %m' 2>/dev/null; then :; else rc=1; fi
	return $rc
}

case "${1:-}" in
install) cmd_install ;;
start) cmd_start ;;
stop) cmd_stop ;;
status) cmd_status ;;
env) env_lines ;;
*)
	echo "usage: $0 install|start|stop|status|env" >&2
	exit 2
	;;
esac
