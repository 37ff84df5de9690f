"""What a hostile Redis client plants for tests/test_queue_attacks.py, and the processes that
hammer one job at once.

`mark` is the planted code: a function that leaves a line in the file named by
$VTADL_PLANTED_MARKER if anything ever calls it (as a job callback, a job function, or from a
pickle). `hammer` runs in processes of their own; it imports only the queue's public API,
never torch.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

MARKER_ENV = "VTADL_PLANTED_MARKER"
MARK = "planted.mark"  # the dotted path that RQ would import


def mark(*args, **kwargs) -> None:
    """Planted code: proof that something read from Redis ran."""
    path = Path(os.environ.get(MARKER_ENV, "planted-marker"))
    with path.open("a") as f:
        f.write(f"called with {len(args)} arguments in process {os.getpid()}\n")


# A protocol-0 pickle whose loading calls `mark("unpickled")`, written out by hand so that
# no test imports pickle: it is only ever planted in Redis, never loaded.
PICKLED = b"cplanted\nmark\n(Vunpickled\ntR."


def _act(action: str, conn, job_id: str, queues: list[str]) -> str:
    from vtadl.exceptions import JobError
    from vtadl.queue import cancel, retry, status

    try:
        if action == "retry":
            return retry(conn, job_id)
        if action == "cancel":
            return cancel(conn, job_id)
        if action == "status":  # its recovery of lost jobs
            status(conn, [job_id])
            return "listed"
        if action == "schedule":
            from vtadl.job_contract import SERIALIZER, VtadlScheduler

            scheduler = VtadlScheduler(queues, connection=conn, serializer=SERIALIZER)
            scheduler.prepare_registries(queues)
            scheduler.enqueue_scheduled_jobs()
            return "scheduled"
    except JobError as exc:
        return f"refused: {exc}"
    except Exception as exc:  # counted by the test, which expects none
        return f"crashed: {type(exc).__name__}: {exc}"
    raise ValueError(f"unknown action {action!r}")


def hammer(
    action: str, url: str, job_id: str, rounds: int, calls: int, gate, start, outcomes
) -> None:
    """`action` on one job `calls` times at once (a thread each), in each of `rounds` rounds.
    A round begins when every process and the test pass the barrier `gate`; then each process
    spins until the time in `start` (sharper than waking from the barrier), and the round ends
    at the next barrier. The threads interleave at every Redis round trip, as processes on
    more cores would."""
    from concurrent.futures import ThreadPoolExecutor

    import redis

    import vtadl.queue  # noqa: F401 - imported before the first round, not in it

    conn = redis.Redis.from_url(url, socket_timeout=30)
    conn.ping()
    with ThreadPoolExecutor(calls) as pool:
        for _ in range(rounds):
            gate.wait()
            at = start.value  # read once: the value's lock would serialise the processes
            while time.time() < at:
                pass
            done = pool.map(lambda _: _act(action, conn, job_id, ["vtadl-normal"]), range(calls))
            outcomes.put(list(done))
            gate.wait()
