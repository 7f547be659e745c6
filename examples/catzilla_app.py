"""The seed's section 4.1 app on real Catzilla (the ``[catzilla]`` extra: catzilla==0.2.3).

    .venv/bin/python examples/catzilla_app.py [--port 8000]

    curl -X POST 'http://127.0.0.1:8000/users/7/notify?message=hello'
    curl -X POST http://127.0.0.1:8000/data -d '{"values": [3, 1, 4, 1, 5]}'
    curl http://127.0.0.1:8000/users/7/notifications
    curl http://127.0.0.1:8000/tasks/stats          # also /tasks/dashboard/ in a browser

Ctrl-C or SIGTERM: Catzilla stops serving, then the engine runs every queued task and exits.
"""

import argparse
import json
import statistics
import threading
from collections import Counter, defaultdict
from typing import Any, Dict

from catzilla import Catzilla, JSONResponse, Path, Query, Request

from catzilla_tasks import BackgroundTasks, TaskPriority
from catzilla_tasks.dashboard import json_safe
from catzilla_tasks.integrations.catzilla import mount_routes

app = Catzilla(production=True, show_banner=False)

# Initialize background task system (the seed's numbers: at most 1000 MB of queued arguments)
app.tasks = BackgroundTasks(
    workers=16,
    enable_auto_scaling=True,
    memory_pool_mb=1000,
)

# The app's "database": notifications per user, and processed results (in memory here).
_lock = threading.Lock()
notifications: Dict[int, list] = defaultdict(list)
notification_count: Counter = Counter()
results: Dict[int, Dict[str, Any]] = {}


def log_notification(user_id: int, message: str) -> None:
    with _lock:
        notifications[user_id].append(message)


def increment_notification_count(user_id: int) -> None:
    with _lock:
        notification_count[user_id] += 1


@app.tasks.task(priority=TaskPriority.HIGH, compile_to_c=True)
def send_notification(user_id: int, message: str):
    """Simple task: compile_to_c=True compiles simple numeric functions to native code; this one
    calls Python functions, so it runs as a Python task (get_stats()["compile_reason"] says why)."""
    log_notification(user_id, message)
    increment_notification_count(user_id)


@app.tasks.task(priority=TaskPriority.NORMAL)
def complex_data_processing(data: Dict[str, Any]):
    """Complex task: summary statistics of the posted values, saved under a new id."""
    values = [float(v) for v in data.get("values", [])]
    result = {
        "n": len(values),
        "mean": statistics.fmean(values) if values else None,
        "median": statistics.median(values) if values else None,
        "stdev": statistics.stdev(values) if len(values) > 1 else None,
    }
    with _lock:
        results[len(results) + 1] = result
    return result


@app.post("/users/{user_id}/notify")
def send_user_notification(request: Request, user_id: int = Path(...), message: str = Query("hello")):
    # Schedule task: returns at once, a worker thread runs it
    result = app.tasks.add_task(send_notification, user_id, message)
    return {"task_id": result.task_id, "status": "queued"}


@app.post("/data")
def process_data(request: Request):
    try:
        data = json.loads(request.body or "{}")
    except ValueError:
        return JSONResponse({"error": "body must be JSON such as {\"values\": [1, 2, 3]}"}, status_code=400)
    result = app.tasks.add_task(complex_data_processing, data)
    return {"task_id": result.task_id, "status": "queued"}


@app.get("/users/{user_id}/notifications")
def user_notifications(request: Request, user_id: int = Path(...)):
    with _lock:
        return {"user_id": user_id, "count": notification_count[user_id], "messages": list(notifications[user_id])}


@app.get("/tasks/stats")
def get_task_stats(request: Request):
    """Get real-time task system performance"""
    return json_safe(app.tasks.monitor.get_stats())


# the live dashboard (/tasks/dashboard/) and Prometheus text (/tasks/metrics); /tasks/stats is above
mount_routes(app, dashboard=True, metrics=True, stats=False)

if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    args = p.parse_args()
    app.listen(args.port, args.host)
