#!/usr/bin/env bash
# The lost-host check of issue #27 on one machine: a Prefect server (:4299), an mlflow server (:5099), a Dask
# scheduler (:8799) and two worker sessions ("hosts"); `vit-pipeline sweep sweeps/quickstart.yaml` on them, and
# host A's whole session SIGKILLed while it trains a trial. Prints the sweep's outcome and the store's runs.
set -u
cd "$(dirname "$0")/.."
[ -f .venv/bin/activate ] && . .venv/bin/activate
# The state folder is removed and made anew: never point LOST_HOST_DIR at real state.
D="${LOST_HOST_DIR:-$PWD/vit-lost-host}"; rm -rf "$D"; mkdir -p "$D"
export VIT_PIPELINE_HOME=$D/home PREFECT_HOME=$D/prefect PREFECT_SERVER_ANALYTICS_ENABLED=false TF_CPP_MIN_LOG_LEVEL=2
export PREFECT_API_URL=http://127.0.0.1:4299/api MLFLOW_TRACKING_URI=http://127.0.0.1:5099 PYTHONPATH="$PWD"
PIDS=()
trap 'for p in "${PIDS[@]}"; do kill -TERM -- -"$p" 2>/dev/null; done' EXIT  # each server's whole session
setsid prefect server start --host 127.0.0.1 --port 4299 > $D/prefect.log 2>&1 &
PIDS+=($!)
setsid mlflow server --host 127.0.0.1 --port 5099 --backend-store-uri sqlite:///$D/mlflow.db --artifacts-destination $D/artifacts --workers 1 > $D/mlflow.log 2>&1 &
PIDS+=($!)
setsid python -m distributed.cli.dask_scheduler --host 127.0.0.1 --port 8799 --no-dashboard > $D/sched.log 2>&1 &
PIDS+=($!)
for i in $(seq 60); do curl -sf $PREFECT_API_URL/health >/dev/null && curl -sf $MLFLOW_TRACKING_URI/health >/dev/null && break; sleep 2; done
setsid python -m distributed.cli.dask_worker tcp://127.0.0.1:8799 --nthreads 1 --memory-limit 0 --no-dashboard > $D/hostA.log 2>&1 &
A=$!
setsid python -m distributed.cli.dask_worker tcp://127.0.0.1:8799 --nthreads 1 --memory-limit 0 --no-dashboard > $D/hostB.log 2>&1 &
PIDS+=($!)
sleep 8
start=$(date +%s)
vit-pipeline sweep sweeps/quickstart.yaml --dask-address tcp://127.0.0.1:8799 --tracking-uri $MLFLOW_TRACKING_URI > $D/sweep.out 2> $D/sweep.err &
S=$!
# wait until host A trains a trial (a RUNNING nested run whose owner is in A's session), then kill A's session
python - "$A" <<'PY'
import os, sys, time
from mlflow import MlflowClient
a = int(sys.argv[1]); c = MlflowClient()
deadline = time.time() + 600
while time.time() < deadline:
    time.sleep(1)
    try:
        runs = c.search_runs([e.experiment_id for e in c.search_experiments()], filter_string="attributes.status = 'RUNNING'")
    except Exception:
        continue
    for r in runs:
        pid = r.data.tags.get("vit_pipeline.owner.pid")
        if "sweep.trial" in r.data.tags and pid:
            try:
                if os.getsid(int(pid)) == a:
                    print(f"killing host A (session {a}) while it trains trial {r.data.tags['sweep.trial']} as run {r.info.run_id}", flush=True)
                    os.killpg(a, 9); sys.exit(0)
            except ProcessLookupError:
                pass
PY
wait $S; echo "sweep exit $? after $(( $(date +%s) - start )) s"
python - <<'PY'
from mlflow import MlflowClient
c = MlflowClient()
exps = [e.experiment_id for e in c.search_experiments()]
parents = c.search_runs(exps, filter_string="tags.`sweep.role` = 'parent'")
p = parents[0]
kids = c.search_runs(exps, filter_string=f"tags.mlflow.parentRunId = '{p.info.run_id}'")
from collections import Counter
print("parent", p.info.status, {k: v for k, v in p.data.metrics.items() if k.startswith("trials")})
print("children by status", Counter(r.info.status for r in kids))
for r in kids:
    if r.info.status != "FINISHED":
        print(" ", r.info.run_id, r.info.status, r.data.tags.get("sweep.trial"), r.data.tags.get("vit_pipeline.end_reason"))
mv = c.get_model_version_by_alias("vit-digits", "champion"); print("champion", mv.name, mv.version, mv.run_id == p.data.tags.get("sweep.best_run_id"))
PY
tail -3 $D/sweep.err
