#!/usr/bin/env bash
# The MLflow tracking server of a cluster (DESIGN 6): runs on the Ray head node, every stage and Ray worker logs to
# http://HEAD:PORT; artifacts (compressors, tables, plots) are proxied by the server into --artifacts-destination,
# so clients and workers need no access to the artifact store themselves.
#
#   infra/mlflow_server.sh start [--host H] [--port P] [--state-dir DIR] [--backend-store-uri URI]
#                                [--artifacts-destination DIR|URI] [--workers N] [--timeout S]
#   infra/mlflow_server.sh stop   [--state-dir DIR]
#   infra/mlflow_server.sh status [--state-dir DIR]
#
# --state-dir (default ~/mlflow) holds mlflow.pid, mlflow.log, tracking_uri (the URI for configs' tracking.uri),
# and by default the SQLite backend store (mlflow.db) and the artifacts (artifacts/). Keep the SQLite file on the head's local disk (SQLite over NFS is
# unsafe); for a store that outlives the head give a database server: --backend-store-uri
# postgresql://USER:PASSWORD@HOST:PORT/DB (driver psycopg2, pinned in requirements.txt), or the same URI in
# $MLFLOW_BACKEND_STORE_URI, which keeps the password off command lines. The URI reaches the server through that
# variable, never its argv (`ps` shows argv to every user), and the password is masked in what this script prints.
# The artifacts belong on shared or object storage (an EFS mount, s3://bucket/prefix).
# `start` is idempotent: a server already running from the same state dir is reused. It returns once /health
# answers (about 15 s), and fails with the log's tail when it does not within --timeout seconds.
# The mlflow executable is $MLFLOW_BIN, else `mlflow` on PATH.
# Needs bash, curl and setsid (util-linux).
set -euo pipefail

usage() { sed -n '/^#   infra\/mlflow_server.sh start/,/^#   infra\/mlflow_server.sh status/p' "$0" | sed 's/^#   //' >&2; exit 2; }

cmd="${1:-}"
[[ -n "$cmd" ]] || usage
shift
host=127.0.0.1
port=5000
state_dir="$HOME/mlflow"
backend="${MLFLOW_BACKEND_STORE_URI:-}"
artifacts=""
workers=2
timeout=180
while [[ $# -gt 0 ]]; do
    case "$1" in
        --host) host="$2"; shift 2 ;;
        --port) port="$2"; shift 2 ;;
        --state-dir) state_dir="$2"; shift 2 ;;
        --backend-store-uri) backend="$2"; shift 2 ;;
        --artifacts-destination) artifacts="$2"; shift 2 ;;
        --workers) workers="$2"; shift 2 ;;
        --timeout) timeout="$2"; shift 2 ;;
        *) echo "mlflow_server.sh: unknown option $1" >&2; usage ;;
    esac
done

mkdir -p "$state_dir"
state_dir="$(cd "$state_dir" && pwd)"
pid_file="$state_dir/mlflow.pid"
log_file="$state_dir/mlflow.log"
backend="${backend:-sqlite:///$state_dir/mlflow.db}"
case "$backend" in
    sqlite:///*|postgresql://*|postgresql+psycopg2://*|mysql://*|mysql+pymysql://*|mssql+pyodbc://*) ;;
    *) echo "mlflow_server.sh: --backend-store-uri '${backend%%://*}://...' is not a database URI; give" \
            "postgresql://USER:PASSWORD@HOST:PORT/DB, or leave it out for SQLite in the state dir" >&2; exit 2 ;;
esac
# SQLAlchemy 2.1 reads postgresql:// as psycopg 3; the driver installed (requirements.txt) is psycopg2.
[[ "$backend" == postgresql://* ]] && backend="postgresql+psycopg2://${backend#postgresql://}"
# The URI as printed: the password (between "user:" and "@") masked.
shown_backend="$(printf '%s' "$backend" | sed -E 's#^([a-z0-9+]+://[^:/@]*):.*@#\1:***@#')"
artifacts="${artifacts:-$state_dir/artifacts}"
mlflow_bin="${MLFLOW_BIN:-mlflow}"
addr_file="$state_dir/mlflow.addr"
# status/stop probe the address the server was started with.
if [[ "$cmd" != start && -f "$addr_file" ]]; then read -r host port < "$addr_file"; fi
export MLFLOW_DISABLE_TELEMETRY=true DO_NOT_TRACK=true
# The server's job runner (huey consumers, for GenAI evaluation jobs) is unused here: six fewer processes.
export MLFLOW_SERVER_ENABLE_JOB_EXECUTION="${MLFLOW_SERVER_ENABLE_JOB_EXECUTION:-false}"

# The pid in the pid file, when that process is alive and is an mlflow server (a pid can be reused).
running_pid() {
    [[ -f "$pid_file" ]] || return 1
    local pid
    pid="$(cat "$pid_file")"
    [[ "$pid" =~ ^[0-9]+$ && -r "/proc/$pid/cmdline" ]] || return 1
    tr '\0' ' ' < "/proc/$pid/cmdline" | grep -q "mlflow" || return 1
    echo "$pid"
}

# 0 when GET /health on the server answers "OK".
healthy() {
    local probe="$host"
    [[ "$probe" == "0.0.0.0" ]] && probe=127.0.0.1
    curl -fsS --max-time 3 "http://$probe:$port/health" 2>/dev/null | grep -q OK
}

stop_server() {
    local pid
    if ! pid="$(running_pid)"; then
        echo "mlflow server: not running (state dir $state_dir)"
        rm -f "$pid_file"
        return 0
    fi
    # The server was started as a session leader: its process group holds the uvicorn workers too.
    kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 1 50); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.2
    done
    kill -KILL -- "-$pid" 2>/dev/null || true
    rm -f "$pid_file"
    echo "mlflow server: stopped (pid $pid)"
}

case "$cmd" in
    start)
        if pid="$(running_pid)"; then
            echo "mlflow server: already running (pid $pid, state dir $state_dir)"
        else
            command -v "$mlflow_bin" > /dev/null || {
                echo "mlflow_server.sh: '$mlflow_bin' not found; install the project's requirements or set MLFLOW_BIN" >&2
                exit 1; }
            [[ "$artifacts" == *://* ]] || mkdir -p "$artifacts"
            # setsid: the server leads its own session, so `stop` can signal its whole process group and the
            # server outlives the shell (ssh session, ray up setup command) that started it.
            MLFLOW_BACKEND_STORE_URI="$backend" setsid "$mlflow_bin" server --host "$host" --port "$port" \
                --workers "$workers" --artifacts-destination "$artifacts" > "$log_file" 2>&1 < /dev/null &
            echo $! > "$pid_file"
            echo "$host $port" > "$addr_file"
        fi
        pid="$(cat "$pid_file")"
        deadline=$(( $(date +%s) + timeout ))
        until healthy; do
            if ! kill -0 "$pid" 2>/dev/null; then
                echo "mlflow server: exited during start-up; log $log_file:" >&2
                tail -n 30 "$log_file" >&2
                rm -f "$pid_file"
                exit 1
            fi
            if (( $(date +%s) >= deadline )); then
                echo "mlflow server: /health did not answer within ${timeout}s; log $log_file:" >&2
                tail -n 30 "$log_file" >&2
                stop_server >&2
                exit 1
            fi
            sleep 0.5
        done
        # The address other machines use (the head's first IP when bound to every interface), for configs:
        # tracking.uri: <contents of this file>.
        reach="$host"
        [[ "$reach" == "0.0.0.0" ]] && reach="$(hostname -I 2>/dev/null | awk '{print $1}')"
        echo "http://${reach:-127.0.0.1}:$port" > "$state_dir/tracking_uri"
        echo "mlflow server: http://$host:$port (pid $pid, backend $shown_backend, artifacts $artifacts, log $log_file)"
        ;;
    stop) stop_server ;;
    status)
        if pid="$(running_pid)" && healthy; then
            echo "mlflow server: running (pid $pid) at http://$host:$port"
        else
            echo "mlflow server: not running (state dir $state_dir)"
            exit 1
        fi
        ;;
    *) usage ;;
esac
