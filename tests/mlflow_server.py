"""A throwaway ``mlflow server`` (sqlite backend, one worker) on 127.0.0.1 for tests, and its REST API."""
from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def mlflow_server(folder: Path, timeout: float = 120.0) -> Iterator[str]:
    """Start the server with its db and artifacts under ``folder``; yield its URL; stop it."""
    port = _free_port()
    mlflow_cli = Path(sys.executable).parent / "mlflow"
    log = (folder / "server.log").open("w")
    proc = subprocess.Popen(
        [str(mlflow_cli), "server", "--backend-store-uri", f"sqlite:///{folder / 'mlflow.db'}",
         "--artifacts-destination", str(folder / "mlartifacts"), "--host", "127.0.0.1",
         "--port", str(port), "--workers", "1"],
        stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"mlflow server did not come up: {(folder / 'server.log').read_text()[-2000:]}")
            time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def rest(url: str, endpoint: str, body: dict | None = None) -> dict:
    """GET (``body`` None) or POST JSON to ``{url}/api/2.0/mlflow/{endpoint}``."""
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(f"{url}/api/2.0/mlflow/{endpoint}", data=data,
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())


def search_runs(url: str, experiment: str) -> list[dict]:
    """Every run of ``experiment`` as ``{"tags": {...}, "metrics": {...}, "params": {...}}``."""
    exp = rest(url, f"experiments/get-by-name?experiment_name={experiment}")["experiment"]["experiment_id"]
    runs, token = [], None
    while True:
        page = rest(url, "runs/search", {"experiment_ids": [exp], "max_results": 500,
                                          **({"page_token": token} if token else {})})
        runs += page.get("runs", [])
        token = page.get("next_page_token")
        if not token:
            break
    return [{key: {kv["key"]: kv["value"] for kv in run["data"].get(key, [])} for key in ("tags", "metrics", "params")}
            | {"run_id": run["info"]["run_id"]} for run in runs]
