#!/usr/bin/env bash
# The local stack: a Ray head (dashboard and job API on loopback) and an MLflow server on loopback, started and
# stopped together.
#
#   launch/local.sh start [ray|mlflow]   # both by default; prints what to export
#   launch/local.sh status
#   launch/local.sh stop [ray|mlflow]    # ends only the process groups this script started
#
# Each service runs in its own process group whose id is recorded in the state directory; `stop` signals
# exactly those groups (TERM, then KILL after a grace period). It never runs `ray stop`, which would end every
# Ray on the machine, other users' included.
#
# Settings (environment):
#   GEOPOSE_LOCAL_DIR        state: pids, logs, Ray's token, the MLflow database (default: <repo>/runs/local)
#   GEOPOSE_RAY_PORT         Ray's GCS port (6379)
#   GEOPOSE_DASHBOARD_PORT   dashboard and job API (8265)
#   GEOPOSE_CLIENT_PORT      Ray client server (10001)
#   GEOPOSE_MLFLOW_PORT      MLflow (5000)
#   GEOPOSE_RAY_TMPDIR       Ray's session directory; keep it short, Ray's socket paths must fit 107 bytes
#                            (default: /tmp/geopose-ray-<uid>)
#   GEOPOSE_RAY_CPUS         CPUs Ray may use (default: all)
#   GEOPOSE_STOP_GRACE_S     seconds between TERM and KILL on `stop` (10)
#   MLFLOW_BACKEND_STORE_URI      default sqlite:///<state>/mlflow.db
#   MLFLOW_ARTIFACTS_DESTINATION  default <state>/mlartifacts
#   MLFLOW_APP_NAME               e.g. basic-auth (then also set MLFLOW_AUTH_ADMIN_PASSWORD and
#                                 MLFLOW_FLASK_SERVER_SECRET_KEY in the environment)
#   MLFLOW_SERVER_ENABLE_JOB_EXECUTION  default false: no MLflow background-job runner (eight processes that
#                                 the sweep never uses and that cost an idle head over half a core: docs/benchmarks/mlflow-server.md,
#                                 "The MLflow server"); true turns it back on
#   MLFLOW_DISABLE_TELEMETRY     default true: MLflow 3 sends usage telemetry unless told not to
set -euo pipefail
set -m # every background job gets its own process group: `stop` signals the group, children included

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
STATE="${GEOPOSE_LOCAL_DIR:-$ROOT/runs/local}"
HOST=127.0.0.1
RAY_PORT="${GEOPOSE_RAY_PORT:-6379}"
DASHBOARD_PORT="${GEOPOSE_DASHBOARD_PORT:-8265}"
CLIENT_PORT="${GEOPOSE_CLIENT_PORT:-10001}"
MLFLOW_PORT="${GEOPOSE_MLFLOW_PORT:-5000}"
RAY_TMP="${GEOPOSE_RAY_TMPDIR:-/tmp/geopose-ray-$(id -u)}"
START_TIMEOUT_S=120
# Ray's own orderly shutdown can take half a minute; its state is throwaway here, so the rest gets KILL.
STOP_GRACE_S="${GEOPOSE_STOP_GRACE_S:-10}"

die() {
	echo "local.sh: $*" >&2
	exit 2
}

# The project's virtual environment when there is one, else whatever is on PATH.
tool() {
	if [[ -x "$ROOT/.venv/bin/$1" ]]; then
		echo "$ROOT/.venv/bin/$1"
	elif command -v "$1" >/dev/null; then
		command -v "$1"
	else
		die "\`$1\` not found: run \`make setup\` (or pip install the project) first"
	fi
}

pidfile() { echo "$STATE/$1.pid"; }

# True while process group $1 has a member that is not a zombie (a zombie has ended; `kill -0` still finds it).
group_alive() {
	if ! command -v ps >/dev/null; then
		kill -0 -- "-$1" 2>/dev/null
		return
	fi
	ps -A -o pgid= -o stat= | awk -v g="$1" '$1 == g && $2 !~ /^Z/ { found = 1 } END { exit !found }'
}

# True if the process group recorded for service $1 is still alive.
running() {
	local f
	f="$(pidfile "$1")"
	[[ -s "$f" ]] && group_alive "$(cat "$f")"
}

wait_for_http() { # name url
	local deadline=$((SECONDS + START_TIMEOUT_S)) python
	python="$(tool python)"
	while ((SECONDS < deadline)); do
		running "$1" || die "$1 exited while starting; see $STATE/$1.log"
		# Any HTTP answer means it is up (Ray's token authentication refuses an anonymous request with 401).
		if "$python" - "$2" <<'PY' 2>/dev/null; then
import sys, urllib.error, urllib.request
try:
    urllib.request.urlopen(sys.argv[1], timeout=2).close()
except urllib.error.HTTPError:
    pass
PY
			return 0
		fi
		sleep 0.5
	done
	die "$1 did not answer at $2 within ${START_TIMEOUT_S}s; see $STATE/$1.log"
}

STARTED=() # the services this call started

undo_start() {
	local name
	for name in ${STARTED[@]+"${STARTED[@]}"}; do
		stop_one "$name" >/dev/null || true
	done
}

start_ray() {
	running ray && {
		echo "ray: already running (pgid $(cat "$(pidfile ray)"))"
		return 0
	}
	local ray token
	ray="$(tool ray)"
	mkdir -p "$STATE" "$RAY_TMP"
	# Ray's token authentication with a token of this stack's own (not ~/.ray/auth_token): every client needs
	# RAY_AUTH_MODE=token and RAY_AUTH_TOKEN_PATH, which `start` prints and writes to $STATE/env.
	token="$STATE/ray_auth_token"
	if [[ ! -s "$token" ]]; then
		(umask 077 && head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$token")
	fi
	# No --node-ip-address 127.0.0.1: Ray replaces a loopback address with the machine's own, and its GCS and
	# raylet listen on every interface whatever it says; the token below is what guards them (launch/README.md).
	local args=(start --head --block --disable-usage-stats --port "$RAY_PORT"
		--dashboard-host "$HOST" --dashboard-port "$DASHBOARD_PORT"
		--ray-client-server-port "$CLIENT_PORT" --temp-dir "$RAY_TMP")
	if [[ -n "${GEOPOSE_RAY_CPUS:-}" ]]; then
		args+=(--num-cpus "$GEOPOSE_RAY_CPUS")
	fi
	# nohup: the stack outlives the shell that started it (on a cluster head, a `docker exec` session).
	RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH="$token" nohup "$ray" "${args[@]}" >"$STATE/ray.log" 2>&1 &
	echo "$!" >"$(pidfile ray)"
	STARTED+=(ray)
	wait_for_http ray "http://$HOST:$DASHBOARD_PORT/api/version"
	echo "ray: dashboard and job API at http://$HOST:$DASHBOARD_PORT (pgid $(cat "$(pidfile ray)"))"
}

start_mlflow() {
	running mlflow && {
		echo "mlflow: already running (pgid $(cat "$(pidfile mlflow)"))"
		return 0
	}
	local mlflow
	mlflow="$(tool mlflow)"
	mkdir -p "$STATE"
	local args=(server --host "$HOST" --port "$MLFLOW_PORT" --workers 1
		--backend-store-uri "${MLFLOW_BACKEND_STORE_URI:-sqlite:///$STATE/mlflow.db}"
		--artifacts-destination "${MLFLOW_ARTIFACTS_DESTINATION:-$STATE/mlartifacts}")
	if [[ -n "${MLFLOW_APP_NAME:-}" ]]; then
		args+=(--app-name "$MLFLOW_APP_NAME")
	fi
	MLFLOW_SERVER_ENABLE_JOB_EXECUTION="${MLFLOW_SERVER_ENABLE_JOB_EXECUTION:-false}" \
		MLFLOW_DISABLE_TELEMETRY="${MLFLOW_DISABLE_TELEMETRY:-true}" \
		nohup "$mlflow" "${args[@]}" >"$STATE/mlflow.log" 2>&1 &
	echo "$!" >"$(pidfile mlflow)"
	STARTED+=(mlflow)
	wait_for_http mlflow "http://$HOST:$MLFLOW_PORT/health"
	echo "mlflow: tracking server and UI at http://$HOST:$MLFLOW_PORT (pgid $(cat "$(pidfile mlflow)"))"
}

# What a client needs, for the services running from this state directory.
write_env() {
	{
		if running ray; then
			echo "export RAY_ADDRESS=http://$HOST:$DASHBOARD_PORT"
			echo "export RAY_AUTH_MODE=token"
			echo "export RAY_AUTH_TOKEN_PATH=$STATE/ray_auth_token"
		fi
		if running mlflow; then
			echo "export MLFLOW_TRACKING_URI=http://$HOST:$MLFLOW_PORT"
		fi
	} >"$STATE/env"
	echo "for clients: source $STATE/env"
}

stop_one() {
	local name="$1" f pgid
	f="$(pidfile "$name")"
	if [[ ! -s "$f" ]]; then
		echo "$name: not started by this script"
		return 0
	fi
	pgid="$(cat "$f")"
	[[ "$pgid" =~ ^[0-9]+$ ]] || die "$f does not hold a process group id"
	if kill -TERM -- "-$pgid" 2>/dev/null; then
		local deadline=$((SECONDS + STOP_GRACE_S))
		while group_alive "$pgid" && ((SECONDS < deadline)); do
			sleep 0.5
		done
		if group_alive "$pgid"; then
			kill -KILL -- "-$pgid" 2>/dev/null || true
			deadline=$((SECONDS + 10)) # KILL is delivered, not awaited: wait until the group is gone
			while group_alive "$pgid" && ((SECONDS < deadline)); do
				sleep 0.2
			done
		fi
		if group_alive "$pgid"; then
			echo "$name: process group $pgid still has live members after KILL" >&2
			return 1
		fi
		echo "$name: stopped (pgid $pgid)"
	else
		echo "$name: was not running"
	fi
	rm -f "$f"
}

status_one() {
	if running "$1"; then
		echo "$1: running (pgid $(cat "$(pidfile "$1")"))"
	else
		echo "$1: not running"
	fi
}

main() {
	local cmd="${1:-}" what="${2:-all}"
	case "$what" in
	all | ray | mlflow) ;;
	*) die "unknown service '$what': use ray, mlflow or nothing for both" ;;
	esac
	case "$cmd" in
	start)
		# A failure stops what this call started, so nothing is left half up.
		trap 'undo_start' EXIT
		if [[ "$what" != mlflow ]]; then start_ray; fi
		if [[ "$what" != ray ]]; then start_mlflow; fi
		trap - EXIT
		write_env
		;;
	stop)
		local rc=0
		if [[ "$what" != ray ]]; then stop_one mlflow || rc=1; fi
		if [[ "$what" != mlflow ]]; then stop_one ray || rc=1; fi
		return "$rc"
		;;
	status)
		status_one ray
		status_one mlflow
		;;
	*) die "usage: launch/local.sh start|stop|status [ray|mlflow]" ;;
	esac
}

main "$@"
