import pytest

from catzilla_tasks import TaskConfig, TaskPriority, TaskStatus


def test_priorities_are_ordered_ints():
    assert [p.value for p in TaskPriority] == [0, 1, 2, 3]
    assert TaskPriority.CRITICAL < TaskPriority.HIGH < TaskPriority.NORMAL < TaskPriority.LOW


def test_status_final_flags():
    assert not TaskStatus.PENDING.is_final and not TaskStatus.RUNNING.is_final
    assert all(
        s.is_final for s in (TaskStatus.SUCCEEDED, TaskStatus.FAILED, TaskStatus.CANCELLED, TaskStatus.TIMED_OUT)
    )


def test_defaults():
    c = TaskConfig()
    assert c.priority is TaskPriority.NORMAL
    assert (c.delay_ms, c.max_retries, c.timeout_ms, c.retry_backoff, c.memory_limit_mb) == (
        0,
        0,
        None,
        "exponential",
        None,
    )


@pytest.mark.parametrize(
    "prio, expected",
    [(TaskPriority.HIGH, TaskPriority.HIGH), (0, TaskPriority.CRITICAL), ("low", TaskPriority.LOW)],
)
def test_priority_forms(prio, expected):
    assert TaskConfig(priority=prio).priority is expected


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"priority": 7}, "priority"),
        ({"priority": "urgent"}, "priority"),
        ({"priority": True}, "priority"),
        ({"delay_ms": -1}, "delay_ms"),
        ({"delay_ms": "5"}, "delay_ms"),
        ({"timeout_ms": -5}, "timeout_ms"),
        ({"timeout_ms": 0}, "timeout_ms"),
        ({"max_retries": -1}, "max_retries"),
        ({"max_retries": 1.5}, "max_retries"),
        ({"retry_backoff": "random"}, "retry_backoff"),
        ({"memory_limit_mb": 0}, "memory_limit_mb"),
    ],
)
def test_bad_values_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=f"^{field}:"):
        TaskConfig(**kwargs)


def test_replace_and_equality():
    c = TaskConfig(priority=TaskPriority.HIGH)
    d = c.replace(priority=TaskPriority.LOW)
    assert d.priority is TaskPriority.LOW and c.priority is TaskPriority.HIGH
    assert c == TaskConfig(priority=1) and hash(c) == hash(TaskConfig(priority=1))
    with pytest.raises(TypeError, match="unknown TaskConfig field"):
        c.replace(colour="red")
    assert "priority=<TaskPriority.HIGH" in repr(c)
