#!/usr/bin/env bash
# Run vit-pipeline on real local services: Prefect server, MLflow tracking server,
# a process worker, and the deployments from prefect.yaml.
#
#   deploy/local.sh prefect-server   # Prefect API + UI on :4200 (SQLite, or PostgreSQL via PREFECT_SERVER_DATABASE_CONNECTION_URL)
#   deploy/local.sh mlflow-server    # MLflow tracking server on :5000 (SQLite backend, artifacts served by the server)
#   deploy/local.sh deploy           # work pool + every deployment in prefect.yaml + the zombie automations
#   deploy/local.sh worker           # process worker that runs scheduled and triggered flow runs
#   deploy/local.sh smoke            # trigger the quickstart smoke deployment and wait for it
#   deploy/local.sh dask-scheduler   # Dask scheduler for sweeps on :8786 (dashboard :8787)
#   deploy/local.sh dask-worker      # Dask workers: one process per GPU (GPU resource), else DASK_WORKERS processes
#
# Each server runs in the foreground (use separate terminals, tmux or systemd).
# Settings (environment): VIT_DEPLOY_DIR (state, default ./vit-services), PREFECT_PORT (4200),
# MLFLOW_PORT (5000), HOST (127.0.0.1), WORK_POOL (vit-pipeline), DASK_PORT (8786),
# DASK_SCHEDULER (tcp://$HOST:$DASK_PORT), DASK_WORKERS (2), WORKER_HEALTH_PORT (unset: no health endpoint;
# set, the worker serves Prefect's /health there: Prefect 3.9.1's worker with it stops on a second SIGINT,
# not on SIGTERM, and two workers on one host need two ports).
set -euo pipefail
cd "$(dirname "$0")/.."
export VIT_PIPELINE_CHECKOUT="$PWD"
STATE="${VIT_DEPLOY_DIR:-$PWD/vit-services}"
HOST="${HOST:-127.0.0.1}"
PREFECT_PORT="${PREFECT_PORT:-4200}"
MLFLOW_PORT="${MLFLOW_PORT:-5000}"
WORK_POOL="${WORK_POOL:-vit-pipeline}"
export PREFECT_API_URL="${PREFECT_API_URL:-http://$HOST:$PREFECT_PORT/api}"
export MLFLOW_TRACKING_URI="${MLFLOW_TRACKING_URI:-http://$HOST:$MLFLOW_PORT}"
export PREFECT_SERVER_ANALYTICS_ENABLED="${PREFECT_SERVER_ANALYTICS_ENABLED:-false}"
mkdir -p "$STATE"

case "${1:-}" in
  prefect-server)
    # PREFECT_HOME holds the SQLite database unless a PostgreSQL URL is set, e.g.
    # PREFECT_SERVER_DATABASE_CONNECTION_URL=postgresql+asyncpg://prefect:prefect@db:5432/prefect
    PREFECT_HOME="$STATE/prefect" exec prefect server start --host "$HOST" --port "$PREFECT_PORT"
    ;;
  mlflow-server)
    exec mlflow server --host "$HOST" --port "$MLFLOW_PORT" \
      --backend-store-uri "sqlite:///$STATE/mlflow.db" \
      --artifacts-destination "$STATE/mlflow-artifacts" --workers 1
    ;;
  deploy)
    prefect work-pool create "$WORK_POOL" --type process 2>/dev/null || prefect work-pool inspect "$WORK_POOL" >/dev/null
    prefect --no-prompt deploy --all
    # Prefect's zombie detection: a flow run whose heartbeats stop is marked Crashed, and its MLflow runs
    # end KILLED (vit_pipeline/zombies.py; the heartbeat period is prefect.yaml's).
    vit-pipeline automations --heartbeat-seconds 60
    ;;
  worker)
    health=()
    if [ -n "${WORKER_HEALTH_PORT:-}" ]; then
      export PREFECT_WORKER_WEBSERVER_HOST="$HOST" PREFECT_WORKER_WEBSERVER_PORT="$WORKER_HEALTH_PORT"
      health=(--with-healthcheck)
    fi
    VIT_PIPELINE_HOME="${VIT_PIPELINE_HOME:-$STATE/work}" exec prefect worker start --pool "$WORK_POOL" ${health[@]+"${health[@]}"}
    ;;
  smoke)
    prefect deployment run 'train-pipeline/quickstart-smoke' --watch
    ;;
  dask-scheduler)
    exec python -m distributed.cli.dask_scheduler --host "$HOST" --port "${DASK_PORT:-8786}"
    ;;
  dask-worker)
    # Trials read and write VIT_PIPELINE_HOME: workers on other hosts need it on shared storage.
    export VIT_PIPELINE_HOME="${VIT_PIPELINE_HOME:-$STATE/work}" PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
    SCHED="${DASK_SCHEDULER:-tcp://$HOST:${DASK_PORT:-8786}}"
    gpus=$(ls /dev/nvidia[0-9]* 2>/dev/null | wc -l)
    if [ "$gpus" -gt 0 ]; then
      # One single-threaded worker per GPU, each pinned to its GPU and advertising it.
      for i in $(seq 0 $((gpus - 1))); do
        CUDA_VISIBLE_DEVICES=$i python -m distributed.cli.dask_worker "$SCHED" --nthreads 1 \
          --resources GPU=1 --memory-limit 0 --name "gpu$i" &
      done
      wait
    else
      exec python -m distributed.cli.dask_worker "$SCHED" --nworkers "${DASK_WORKERS:-2}" --nthreads 1 --memory-limit 0
    fi
    ;;
  *)
    sed -n '2,16p' "$0"
    exit 2
    ;;
esac
