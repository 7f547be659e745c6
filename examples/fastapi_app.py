"""The FastAPI twin of examples/catzilla_app.py, on uvicorn (FastAPI and uvicorn installed).

    .venv/bin/python examples/fastapi_app.py [--port 8000]

    curl -X POST 'http://127.0.0.1:8000/users/7/notify?message=hello'
    curl -X POST 'http://127.0.0.1:8000/users/7/welcome?q=docs'
    curl -X POST http://127.0.0.1:8000/data -H 'content-type: application/json' -d '{"values": [3, 1, 4, 1, 5]}'
    curl http://127.0.0.1:8000/users/7/notifications
    curl http://127.0.0.1:8000/tasks/stats          # also /tasks/dashboard/ in a browser

Two ways to take the background tasks of a route:

- ``BackgroundTasks`` (``/users/{id}/welcome``): the drop-in for ``fastapi.BackgroundTasks``,
  the only change from a plain FastAPI app is the import. FastAPI's semantics: the tasks of the
  request (its dependencies' and its own) run after the response, in the order added, each on
  the engine's workers.
- ``DetachedBackgroundTasks`` (``/users/{id}/notify``, ``/data``): the detached mode. add_task
  queues into the engine at once and returns a TaskResult (its id goes back to the client); the
  response does not wait, and tasks run by priority.

The app's lifespan starts the engine and, at shutdown (Ctrl-C, SIGTERM), runs what is queued
(without it, the drop-ins use a process-wide engine, drained at exit).
"""

import argparse
import statistics
import threading
from collections import Counter, defaultdict
from typing import Any, Dict, List

from fastapi import Depends, FastAPI
from pydantic import BaseModel

from catzilla_tasks import TaskPriority, task
from catzilla_tasks.integrations.fastapi import BackgroundTasks, DetachedBackgroundTasks, lifespan, routes

app = FastAPI(lifespan=lifespan(workers=16, enable_auto_scaling=True, memory_pool_mb=1000))
app.mount("/tasks", routes())  # /tasks/stats, /tasks/dashboard/, /tasks/metrics

_lock = threading.Lock()
notifications: Dict[int, list] = defaultdict(list)
notification_count: Counter = Counter()
results: Dict[int, Dict[str, Any]] = {}


@task(priority=TaskPriority.HIGH)
def send_notification(user_id: int, message: str) -> None:
    with _lock:
        notifications[user_id].append(message)
        notification_count[user_id] += 1


@task(priority=TaskPriority.NORMAL)
def complex_data_processing(values: List[float]) -> Dict[str, Any]:
    result = {
        "n": len(values),
        "mean": statistics.fmean(values) if values else None,
        "median": statistics.median(values) if values else None,
        "stdev": statistics.stdev(values) if len(values) > 1 else None,
    }
    with _lock:
        results[len(results) + 1] = result
    return result


class Data(BaseModel):
    values: List[float] = []


@app.post("/users/{user_id}/notify")
def send_user_notification(user_id: int, background_tasks: DetachedBackgroundTasks, message: str = "hello"):
    result = background_tasks.add_task(send_notification, user_id, message)
    return {"task_id": result.task_id, "status": "queued"}


def note_query(background_tasks: BackgroundTasks, user_id: int, q: str = ""):
    if q:
        background_tasks.add_task(send_notification, user_id, f"found query: {q}")


@app.post("/users/{user_id}/welcome", dependencies=[Depends(note_query)])
def welcome(user_id: int, background_tasks: BackgroundTasks):
    # runs after the response and after note_query's task, as with fastapi.BackgroundTasks
    background_tasks.add_task(send_notification, user_id, "welcome")
    return {"status": "sent"}


@app.post("/data")
def process_data(data: Data, background_tasks: DetachedBackgroundTasks):
    result = background_tasks.add_task(complex_data_processing, data.values)
    return {"task_id": result.task_id, "status": "queued"}


@app.get("/users/{user_id}/notifications")
def user_notifications(user_id: int):
    with _lock:
        return {"user_id": user_id, "count": notification_count[user_id], "messages": list(notifications[user_id])}


if __name__ == "__main__":
    import uvicorn

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    args = p.parse_args()
    uvicorn.run(app, host=args.host, port=args.port)
