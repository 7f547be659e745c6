"""The main job of catzilla_tasks, on the in-process default engine.

Run it with `make demo` (it creates the virtualenv and builds the C engine first).
"""

import asyncio
import time

from catzilla_tasks import BackgroundTasks, TaskFuture, TaskPriority

tasks = BackgroundTasks()  # zero configuration: in-process, one worker thread per core x2


@tasks.task(priority=TaskPriority.CRITICAL)
def charge_card(order_id: int, amount: float) -> str:
    return f"order {order_id}: charged {amount:.2f}"


@tasks.task(priority=TaskPriority.HIGH)
def send_email(to: str, subject: str) -> str:
    time.sleep(0.01)  # pretend to talk to a mail server; other tasks run meanwhile
    return f"mail to {to}: {subject!r}"


@tasks.task(priority=TaskPriority.LOW)
def clean_cache(prefix: str) -> int:
    return len(prefix)


async def fetch_profile(user_id: int) -> dict:
    await asyncio.sleep(0.05)  # runs on the engine's event loop, with many others at once
    return {"id": user_id, "name": f"user-{user_id}"}


def flaky_export(path: str) -> None:
    raise OSError(f"disk full while writing {path}")


def main() -> None:
    print("catzilla_tasks demo\n")

    # 1. Tasks of every priority; add_task returns at once with a TaskResult.
    charge = tasks.add_task(charge_card, 1001, amount=42.5)
    mail = tasks.add_task(send_email, "ada@example.com", subject="Your receipt")
    normal = tasks.add_task(sum, range(1_000_000))  # any callable: NORMAL by default
    chore = tasks.add_task(clean_cache, "sessions:")
    for r in (charge, mail, normal, chore):
        print(f"  {r.priority.name:<8} {r.task_id}  ->  {r.wait(timeout=5)!r}")

    # 2. A result waited on from asyncio, and an async task.
    async def handler() -> None:
        profile = await tasks.add_task(fetch_profile, 7)
        print(f"\n  awaited async task: {profile}")
        many = await asyncio.gather(*(tasks.add_task(fetch_profile, i) for i in range(100)))
        print(f"  100 async tasks ran concurrently on the engine loop: {len(many)} profiles")

    asyncio.run(handler())

    # 3. A failure, handled: the error comes back to whoever asks; the worker lives on.
    failed = tasks.add_task(flaky_export, "/tmp/report.csv")
    try:
        failed.wait(timeout=5)
    except OSError as exc:
        print(f"\n  task failed as expected: {exc!r} (status {failed.status.name})")
    recovered = TaskFuture(failed).catch(lambda exc: "fell back to the backup disk")
    print(f"  TaskFuture.catch -> {recovered.wait(5)!r}")
    chained = TaskFuture(tasks.add_task(int, "20")).then(lambda v: v + 1).then(lambda v: v * 2)
    print(f"  TaskFuture.then chain -> {chained.wait(5)}")

    # 4. Throughput, then the engine's own figures.
    n = 100_000
    t0 = time.perf_counter()
    submit = tasks.options(block_timeout=5).add_task  # wait for room rather than QueueFull
    handles = [submit(abs, -i) for i in range(n)]
    tasks.join()
    dt = time.perf_counter() - t0
    assert all(h.is_ready() for h in handles)
    print(f"\n  {n:,} tasks submitted and run in {dt * 1000:.0f} ms ({n / dt:,.0f} tasks/s)")
    print(f"  one task: {charge.get_stats()}")

    stats = tasks.stats()
    print("\n  engine stats:")
    for key in ("queued", "running", "submitted", "succeeded", "failed", "cancelled", "workers", "avg_exec_ms"):
        print(f"    {key:<12} {stats[key]}")

    tasks.shutdown()  # runs anything still queued, then stops the workers
    print("\n  shut down cleanly")


if __name__ == "__main__":
    main()
