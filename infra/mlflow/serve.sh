#!/usr/bin/env bash
# A local MLflow tracking server for lawm runs: sqlite backend store, artifacts proxied by the server into a folder.
#
#   make mlflow-server                          # the same, from the repository root (PORT=5001 make mlflow-server)
#   infra/mlflow/serve.sh                       # http://127.0.0.1:5000, data in ./runs/mlflow-server/
#   PORT=5001 MLFLOW_DATA_DIR=/data/mlflow infra/mlflow/serve.sh
#   HOST=10.0.0.5 ALLOWED_HOSTS='10.0.0.5:5000,mlflow.internal:5000' infra/mlflow/serve.sh   # for cluster nodes
#
# Then point lawm at it: MLFLOW_TRACKING_URI=http://127.0.0.1:5000 python jobs/full_pipeline.py --config ...
#
# Environment:
#   HOST (127.0.0.1)  interface to bind; loopback only unless you say otherwise
#   PORT (5000)       port
#   WORKERS (1)       server worker processes (1 starts in ~8 s and ~500 MB)
#   MLFLOW_DATA_DIR (./runs/mlflow-server)  holds mlflow.db and artifacts/
#   BACKEND_STORE_URI (sqlite:///<MLFLOW_DATA_DIR>/mlflow.db)  e.g. a postgresql:// URI instead
#   ARTIFACTS_DESTINATION (<MLFLOW_DATA_DIR>/artifacts)        e.g. s3://bucket/prefix instead
#   ALLOWED_HOSTS     comma-separated Host headers to accept (MLflow's default: localhost and private IPs)
#   MLFLOW            the mlflow executable (default: the checkout's .venv/bin/mlflow, else `mlflow` on PATH)
# Extra arguments are passed to `mlflow server` unchanged. The server replaces this shell (exec), so SIGTERM to this
# script's pid stops MLflow.
set -euo pipefail

here="$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd -- "$here/../.." && pwd)"

host="${HOST:-127.0.0.1}"
port="${PORT:-5000}"
workers="${WORKERS:-1}"
data_dir="${MLFLOW_DATA_DIR:-runs/mlflow-server}"
mkdir -p -- "$data_dir"
data_dir="$(cd -- "$data_dir" && pwd)"   # absolute: sqlite:////abs/path.db
backend="${BACKEND_STORE_URI:-sqlite:///$data_dir/mlflow.db}"
artifacts="${ARTIFACTS_DESTINATION:-$data_dir/artifacts}"
if [[ "$artifacts" != *://* ]]; then
  mkdir -p -- "$artifacts"
fi

if [[ -n "${MLFLOW:-}" ]]; then
  mlflow_bin="$MLFLOW"
elif [[ -x "$repo/.venv/bin/mlflow" ]]; then
  mlflow_bin="$repo/.venv/bin/mlflow"
else
  mlflow_bin="mlflow"
fi

# The job-execution backend (a Huey consumer per worker) is not needed to track runs; off, the server starts faster.
export MLFLOW_SERVER_ENABLE_JOB_EXECUTION="${MLFLOW_SERVER_ENABLE_JOB_EXECUTION:-false}"

args=(server
  --backend-store-uri "$backend"
  --artifacts-destination "$artifacts"
  --host "$host"
  --port "$port"
  --workers "$workers")
if [[ -n "${ALLOWED_HOSTS:-}" ]]; then
  args+=(--allowed-hosts "$ALLOWED_HOSTS")
fi

echo "mlflow server on http://$host:$port (store: $backend, artifacts: $artifacts)" >&2
# MLflow 3.17's UI opens in its GenAI layout unless the link asks for the training one (jobs/tracking.py: ui_url).
echo "runs: http://$host:$port/#/experiments?workflowType=machine_learning" >&2
# The one line a user needs, on stdout: paste it into the shell that runs the pipeline.
echo "export MLFLOW_TRACKING_URI=http://$host:$port"
exec "$mlflow_bin" "${args[@]}" "$@"
