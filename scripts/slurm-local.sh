#!/usr/bin/env bash
# A single-node SLURM cluster on 127.0.0.1 for trying (and testing) `hydra/launcher=submitit_slurm`.
#
#   scripts/slurm-local.sh install   # as root: apt-get install slurm-wlm munge iptables (skipped when present)
#   scripts/slurm-local.sh start     # as root: munged, slurmctld, slurmd with a private slurm.conf
#   eval "$(scripts/slurm-local.sh env)"   # SLURM_CONF and PATH (with the sacct stand-in) for clients
#   scripts/slurm-local.sh status
#   scripts/slurm-local.sh stop      # cancels its jobs, kills the daemons by their (checked) pid files
#
# Everything lives under $SLURM_LOCAL_DIR (default /tmp/linreg-slurm), which start makes fresh: root-owned,
# mode 0711, a munge-owned 0711 subdir for munged. A dir found there that is a symlink, not root's, writable
# by others, or (when not empty) not made by this script is refused. A pid file is trusted only when its
# process is the daemon it names, started with this dir's config. The daemons bind 127.0.0.1 and, while the
# cluster runs, iptables drops packets to its two ports from any interface but lo.
# Nothing under /etc is changed except what the Debian packages install. Checked with Debian bookworm's
# Slurm 22.05 as root, no systemd.
set -euo pipefail

SCRIPTS="$(cd "$(dirname "$0")" && pwd)"
DIR="${SLURM_LOCAL_DIR:-/tmp/linreg-slurm}"
# The parent resolved once, so the checks and every later use see the same real directories.
if parent="$(realpath -e -- "$(dirname -- "$DIR")" 2>/dev/null)"; then DIR="${parent%/}/$(basename -- "$DIR")"; fi
CONF="$DIR/slurm.conf"
MARK="$DIR/.slurm-local" # made by start: a non-empty dir without it is someone else's, never emptied
NODE="$(hostname -s)"
PORT="${SLURM_LOCAL_PORT:-6817}"
PORTS=("$PORT" "$((PORT + 1))") # slurmctld, slurmd
# RealMemory (MB): without it the node has 1 MB and any --mem is rejected; above the real RAM the node drains.
MEM_MB="${SLURM_LOCAL_MEM_MB:-$(awk '/^MemTotal:/ {print int($2 / 1024 / 2)}' /proc/meminfo)}"
PIDS=(slurmd slurmctld munged) # stop order: node daemon, controller, then authentication

say() { echo "slurm-local: $*" >&2; }
die() {
	say "$*"
	exit 1
}

env_lines() {
	# The sacct stand-in goes first on PATH only for the cluster's users (submitit asks sacct for job states).
	echo "export SLURM_CONF=$CONF"
	echo "export PATH=$SCRIPTS:\$PATH"
}

cmd_install() {
	local pkgs=()
	command -v sbatch >/dev/null && command -v slurmctld >/dev/null || pkgs+=(slurm-wlm)
	command -v munged >/dev/null || pkgs+=(munge)
	command -v iptables >/dev/null || pkgs+=(iptables)
	if ((${#pkgs[@]} == 0)); then
		say "slurm-wlm, munge and iptables already installed"
		return 0
	fi
	export DEBIAN_FRONTEND=noninteractive
	apt-get update -q
	apt-get install -y -q "${pkgs[@]}"
}

# Why a path that exists may not be used as (or above) the state dir; empty when it may.
unsafe_reason() {
	local path=$1 uid mode
	if [[ -L $path ]]; then
		echo "it is a symlink (to $(readlink -- "$path"))"
		return
	fi
	[[ -d $path ]] || {
		echo "it is not a directory"
		return
	}
	read -r uid mode < <(stat -c '%u %a' -- "$path")
	if [[ $uid != 0 ]]; then
		echo "it is owned by uid $uid ($(id -nu "$uid" 2>/dev/null || echo unknown)), not root"
	elif ((8#$mode & 8#022)) && ! ((8#$mode & 8#1000)); then
		echo "mode $mode lets other users write to it"
	fi
}

# Refuses (one line, exit 1) a state dir that another user made or can change; call before anything starts.
check_dir() {
	local up why
	[[ -n ${parent:-} ]] || die "refusing state dir $DIR: its parent directory does not exist"
	case "$(basename -- "$DIR")" in . | .. | /) die "refusing state dir $DIR: not a directory name" ;; esac
	# Every real directory above it must be root's and closed to others (or sticky, like /tmp).
	up=$parent
	while :; do
		why=$(unsafe_reason "$up")
		[[ -z $why ]] || die "refusing state dir $DIR: its parent $up: $why"
		[[ $up == / ]] && break
		up=$(dirname -- "$up")
	done
	if [[ -e $DIR || -L $DIR ]]; then
		why=$(unsafe_reason "$DIR")
		[[ -z $why ]] || die "refusing state dir $DIR: $why"
		# Before anything in it is read, stopped or removed: a dir this script did not make is never touched.
		[[ -e $MARK || -z "$(ls -A -- "$DIR")" ]] || die "refusing state dir $DIR: not empty and not made by $0 (no $MARK)"
	fi
	return 0
}

# A fresh, private state dir: the old one (only if ours or empty) is removed, and mkdir fails on anything
# planted in between.
make_dir() {
	if [[ -e $DIR ]]; then
		rm -rf -- "$DIR" # check_dir has refused one this script did not make
	fi
	mkdir -m 0711 -- "$DIR" || die "refusing state dir $DIR: could not create it fresh"
	: >"$MARK"
	install -d -m 0700 "$DIR/state" "$DIR/log"
	install -d -m 0755 "$DIR/spool" "$DIR/run"
}

write_conf() {
	cat >"$CONF" <<EOF
# Written by scripts/slurm-local.sh: one node, this host, 127.0.0.1 only.
ClusterName=linreg-local
SlurmctldHost=$NODE(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$DIR/munge/socket
SlurmctldPort=${PORTS[0]}
SlurmdPort=${PORTS[1]}
# Listen on the configured addresses (SlurmctldHost's and NodeAddr's 127.0.0.1), not on every address.
CommunicationParameters=NoCtldInAddrAny,NoInAddrAny
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
	chmod 0644 "$CONF"
}

# The pid in run/NAME.pid when that process is NAME started with this dir's files; otherwise nothing (and
# a line saying why, when the file names some other process).
daemon_pid() {
	local name=$1 f="$DIR/run/$1.pid" pid exe want
	[[ -f $f && ! -L $f ]] || return 1
	pid=$(head -c 32 -- "$f" | tr -d '[:space:]')
	[[ $pid =~ ^[1-9][0-9]*$ ]] || return 1
	[[ -d /proc/$pid ]] || return 1
	exe=$(readlink -- "/proc/$pid/exe" 2>/dev/null || echo "?")
	exe=${exe% (deleted)}
	# Debian's slurmctld is an alternatives link to slurmctld-wlm: compare with the real file.
	want=$(readlink -f -- "$(command -v "$name" || echo "/usr/sbin/$name")")
	if [[ $exe != "$want" ]] || ! tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -qF -- "$DIR/"; then
		say "ignoring $f: pid $pid is $exe, not this cluster's $name"
		return 1
	fi
	echo "$pid"
}

pid_alive() { daemon_pid "$1" >/dev/null 2>&1; }

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
	local pid
	if [[ ! -s /etc/munge/munge.key ]]; then
		# The package's post-install normally creates it; an image built without it needs one.
		mungekey --create --keyfile=/etc/munge/munge.key
		chown munge:munge /etc/munge/munge.key
		chmod 0400 /etc/munge/munge.key
	fi
	# munged runs as munge: its own dir under the 0711 top (a 0700 root parent would lock it out).
	# A private socket (named in slurm.conf's AuthInfo), so a system munged is neither used nor disturbed.
	install -d -o munge -g munge -m 0711 "$DIR/munge"
	runuser -u munge -- /usr/sbin/munged --socket="$DIR/munge/socket" --pid-file="$DIR/munge/munged.pid" \
		--log-file="$DIR/munge/munged.log" --seed-file="$DIR/munge/munged.seed"
	wait_for 10 "munged pid file" test -s "$DIR/munge/munged.pid"
	# Only the number is copied from munge's dir into root's run/.
	pid=$(head -c 32 -- "$DIR/munge/munged.pid" | tr -dc '0-9')
	echo "$pid" >"$DIR/run/munged.pid"
	wait_for 10 "munge credentials" bash -c "munge -S '$DIR/munge/socket' -n | unmunge -S '$DIR/munge/socket'"
}

# iptables -A/-D of one rule per port, each only when needed, so both are safe to repeat.
FIREWALL_RULE=(INPUT ! -i lo -p tcp --dport)
firewall_on() {
	local port
	if ! command -v iptables >/dev/null || ! iptables -S INPUT >/dev/null 2>&1; then
		say "iptables not usable here: ports ${PORTS[*]} are not firewalled (the daemons still bind 127.0.0.1 only)"
		return 0
	fi
	for port in "${PORTS[@]}"; do
		iptables -C "${FIREWALL_RULE[@]}" "$port" -j DROP 2>/dev/null || iptables -A "${FIREWALL_RULE[@]}" "$port" -j DROP
	done
	# stop removes the rules only for a dir that added them (another dir's cluster keeps its own).
	echo "${PORTS[*]}" >"$DIR/run/iptables"
}

firewall_off() {
	local port
	[[ -f $DIR/run/iptables && ! -L $DIR/run/iptables ]] || return 0
	for port in $(tr -dc '0-9 ' <"$DIR/run/iptables"); do
		while iptables -C "${FIREWALL_RULE[@]}" "$port" -j DROP 2>/dev/null; do
			iptables -D "${FIREWALL_RULE[@]}" "$port" -j DROP
		done
	done
	rm -f -- "$DIR/run/iptables"
}

cmd_start() {
	[[ $(id -u) == 0 ]] || die "start needs root (slurmd runs jobs as their users)"
	check_dir
	command -v slurmctld >/dev/null || die "slurmctld not found: run '$0 install' first"
	if pid_alive slurmctld && pid_alive slurmd && SLURM_CONF=$CONF scontrol ping >/dev/null 2>&1; then
		say "already running ($CONF)"
		env_lines
		return 0
	fi
	# A half-started cluster of this dir goes first: the dir is made anew under it.
	if [[ -e $DIR ]]; then
		stop_daemons
		firewall_off
	fi
	make_dir
	write_conf
	firewall_on
	start_munge
	SLURM_CONF=$CONF slurmctld -c -f "$CONF" # -c: a fresh queue, no jobs from an earlier run
	wait_for 20 "slurmctld (scontrol ping)" env SLURM_CONF="$CONF" scontrol ping
	SLURM_CONF=$CONF slurmd -f "$CONF" -N "$NODE"
	wait_for 30 "node $NODE idle" node_idle
	say "cluster up: node $NODE, partition debug, $(nproc) CPUs, ${MEM_MB} MB; run:"
	env_lines
}

stop_daemons() {
	local name pid i
	if pid_alive slurmctld; then
		# Jobs still running would outlive slurmd (their slurmstepd): cancel them first; the cluster is ours alone.
		SLURM_CONF=$CONF scancel --partition=debug 2>/dev/null || true
		wait_for 10 "jobs to end" bash -c "[[ -z \$(SLURM_CONF='$CONF' squeue -h -t R,CG,PD 2>/dev/null) ]]" || true
	fi
	for name in "${PIDS[@]}"; do
		if ! pid=$(daemon_pid "$name"); then
			rm -f -- "$DIR/run/$name.pid"
			continue
		fi
		kill "$pid"
		for ((i = 0; i < 100; i++)); do
			kill -0 "$pid" 2>/dev/null || break
			sleep 0.1
		done
		if kill -0 "$pid" 2>/dev/null; then
			say "$name ($pid) ignored SIGTERM; sending SIGKILL"
			kill -9 "$pid" 2>/dev/null || true
		fi
		rm -f -- "$DIR/run/$name.pid"
		say "stopped $name ($pid)"
	done
}

cmd_stop() {
	check_dir
	[[ -d $DIR ]] || return 0
	stop_daemons
	firewall_off
}

cmd_status() {
	local name pid rc=0
	check_dir
	for name in "${PIDS[@]}"; do
		if pid=$(daemon_pid "$name"); then
			echo "$name: running (pid $pid)"
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
