#!/usr/bin/env bash
# docs/mlflow.png: MLflow's comparison view of the eval runs of the newest pipeline run, taken by headless
# Chromium (Debian's `chromium`). Run from the repo root after `dvc repro`: bash docs/mlflow_png.sh
set -euo pipefail
PORT=${PORT:-5055}
mlflow server --backend-store-uri sqlite:///mlflow.db --host 127.0.0.1 --port "$PORT" --workers 1 >/tmp/mlflow_png.log 2>&1 &
SERVER=$!
trap 'kill $SERVER' EXIT
until curl -sf "127.0.0.1:$PORT/health" >/dev/null; do sleep 1; done
URL=$(MLFLOW_TRACKING_URI="http://127.0.0.1:$PORT" python - <<'PY'
import json, urllib.parse
import mlflow
runs = mlflow.search_runs(experiment_names=["respinquant"], filter_string="tags.stage = 'eval'",
                          order_by=["attributes.start_time DESC"])
newest = runs["tags.pipeline_run"].iloc[0]
runs = runs[runs["tags.pipeline_run"] == newest].drop_duplicates("tags.variant")
q = urllib.parse.quote
print("#/compare-runs?runs=" + q(json.dumps(list(runs["run_id"]))) + "&experiments=" + q(json.dumps(sorted(set(runs["experiment_id"])))))
PY
)
chromium --headless --no-sandbox --disable-gpu --hide-scrollbars --window-size=1600,2400 \
  --virtual-time-budget=20000 --screenshot=docs/mlflow.png "http://127.0.0.1:$PORT/$URL"
