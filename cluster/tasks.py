"""Functions as Ray tasks with resources and retries: what the train job runs its variants on,
and the compress job its trials. It knows no job: it is handed the function and its calls.
Every function here runs inside a `ray_session` (cluster/connect.py)."""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable, Iterator

from capfleet.cluster.connect import first_line


class TaskFailed(RuntimeError):
    """A task whose worker died (or that raised) with its retries spent: `kind` is the error
    Ray reported (WorkerCrashedError, ...), `detail` its first line."""

    def __init__(self, kind: str, detail: str):
        super().__init__(f"{kind}: {detail}")
        self.kind, self.detail = kind, detail


def run_tasks(
    fn: Callable,
    calls: Iterable[tuple[Hashable, tuple, float]],
    max_retries: int = 0,
    fresh_process: bool = True,
) -> Iterator[tuple[Hashable, object, TaskFailed | None]]:
    """Start `fn(*args)` as one task per (key, args, cpus) call, all at once, in the order
    given (Ray starts queued tasks of one kind roughly in that order); yield (key, result,
    error) as each finishes: `error` is None, or a TaskFailed for a task whose worker died
    with its retries spent (then `result` is None). With `fresh_process` each task runs in a
    process of its own (`max_calls=1`): memory a task held ends with it."""
    import ray

    task = ray.remote(max_retries=max_retries, max_calls=1 if fresh_process else 0)(fn)
    pending = {task.options(num_cpus=cpus).remote(*args): key for key, args, cpus in calls}
    while pending:
        [ref], _ = ray.wait(list(pending), num_returns=1)
        key = pending.pop(ref)
        try:
            yield key, ray.get(ref), None
        except ray.exceptions.RayError as e:
            yield key, None, TaskFailed(type(e).__name__, first_line(e))


def run_task(
    fn: Callable, *args, cpus: float = 1.0, max_retries: int = 0, fresh_process: bool = False
):
    """`fn(*args)` as one task, waited for; raises TaskFailed naming the cause (the task's own
    exception, or its worker's death) when it failed."""
    import ray

    task = ray.remote(num_cpus=cpus, max_retries=max_retries, max_calls=1 if fresh_process else 0)(
        fn
    )
    try:
        return ray.get(task.remote(*args))
    except ray.exceptions.RayError as e:  # raised in the task, or its worker died (memory)
        cause = getattr(e, "cause", None) or e
        raise TaskFailed(type(cause).__name__, first_line(cause)) from e
