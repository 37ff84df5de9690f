"""What the job service costs: submission of 15 categories, the wait before a queued job
starts on an idle worker, and one training through the queue against `vtadl train`.

Runs against a private redis-server in a temporary folder (never the shared one):

    python benchmarks/queue_overhead.py                  # 5 epochs of vtadl_small on brick
    python benchmarks/queue_overhead.py --epochs 25      # the make-demo settings
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

VTADL = [sys.executable, "-m", "vtadl"]


def run(*args: str, env: dict) -> float:
    tic = time.perf_counter()
    subprocess.run([*VTADL, *args], env=env, check=True, capture_output=True)
    return time.perf_counter() - tic


def main() -> None:
    from vtadl.data.demo import make_demo_dataset
    from vtadl.queue import fetch, job_state, make_request, submit
    from vtadl.runs import train_config
    from vtadl.service import RedisServer, connect, free_port
    from vtadl.submission import category_requests

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=5, help="jobs timed from enqueue to start")
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="vtadl-queue-bench-"))
    server = RedisServer(tmp / "redis", free_port(), "bench").start()
    env = {**os.environ, "VTADL_REDIS_URL": server.url}
    conn = connect(server.url)
    try:
        # 15 categories: the tiny demo brick under 15 names, an MVTec-shaped tree.
        make_demo_dataset(tmp / "one", categories=["brick"], image_size=32, n_train=12)
        for i in range(15):
            shutil.copytree(tmp / "one" / "brick", tmp / "fifteen" / f"part{i:02d}")
        tic = time.perf_counter()  # what `vtadl submit` does before it enqueues
        requests = category_requests(
            dataset="mvtec",
            root=tmp / "fifteen",
            categories=[f"part{i:02d}" for i in range(15)],
            all_categories=False,
            overrides={"train": {"out": str(tmp / "runs")}},
            variant="vtadl_small",
        )
        validated = time.perf_counter() - tic
        tic = time.perf_counter()
        submit(conn, requests)
        enqueued = time.perf_counter() - tic
        print(f"15 categories: validation {validated:.3f} s, enqueue {enqueued * 1000:.1f} ms")
        submit_cli = run(
            "submit", "--root", str(tmp / "fifteen"), "--all-categories", "--out",
            str(tmp / "runs"), "--variant", "vtadl_small", "--force", env=env,
        )  # fmt: skip
        print(f"`vtadl submit --all-categories` (15, whole command): {submit_cli:.2f} s")
        conn.flushdb()

        # Delay from enqueue to start on an idle worker (the job fails at once: no data).
        worker = subprocess.Popen([*VTADL, "worker"], env=env, stderr=subprocess.DEVNULL)
        time.sleep(3)  # idle and waiting
        delays, begins = [], []
        for k in range(args.repeats):
            data = {"root": str(tmp / "missing"), "category": "x"}
            cfg, _ = train_config(overrides={"data": data, "train": {"seed": k}})
            request = make_request("train", cfg)
            tic = time.time()
            (s,) = submit(conn, [request])
            while not (job := fetch(conn, s.job_id)).meta.get("began_at"):
                time.sleep(0.005)
            delays.append(job.started_at.timestamp() - tic)
            begins.append(job.meta["began_at"] - tic)
            while job_state(fetch(conn, s.job_id)) != "failed":  # the worker is idle again
                time.sleep(0.05)
            time.sleep(0.5)
        worker.terminate()
        worker.wait()
        print(
            f"enqueue -> job started (RQ): median {statistics.median(delays):.3f} s; "
            f"-> job function running: median {statistics.median(begins):.3f} s "
            f"({args.repeats} jobs, idle worker)"
        )
        conn.flushdb()

        # One training: `vtadl train` against submit + a burst worker draining it.
        common = ["--root", str(tmp / "demo"), "--category", "brick", "--variant",
                  "vtadl_small", "--epochs", str(args.epochs)]  # fmt: skip
        make_demo_dataset(tmp / "demo", categories=["brick"])
        run("data", "pack", "--root", str(tmp / "demo"), "--category", "brick",
            "--out", str(tmp / "warm"), "--image-size", "128", env=env)  # fmt: skip
        direct = run("train", *common, "--out", str(tmp / "direct"), env=env)
        tic = time.perf_counter()
        run("submit", *common, "--out", str(tmp / "queued"), env=env)
        run("worker", "--burst", env=env)
        queued = time.perf_counter() - tic
        history = [
            json.loads(line)
            for line in next((tmp / "queued").glob("mvtec/brick/*/history.jsonl"))
            .read_text()
            .splitlines()
        ]
        train_s = sum(h["seconds"] for h in history)
        print(
            f"one training ({args.epochs} epochs vtadl_small, brick): vtadl train {direct:.1f} s, "
            f"submit + burst worker {queued:.1f} s, overhead {queued - direct:+.1f} s "
            f"(epochs themselves {train_s:.1f} s)"
        )
    finally:
        server.stop()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
