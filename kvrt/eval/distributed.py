"""Sharding kvrt eval over Ray: each worker loads the model once and runs (cache spec, task,
sample) items; results stream back to the driver, which alone writes the prediction files
(so resume and atomic appends work exactly as in a local run)."""

from __future__ import annotations

from typing import Iterator

from kvrt.errors import KvrtError


def ray_records(address: str, workers: int, settings, items: list, batch: int = 1) -> Iterator[tuple[int, dict]]:
    """Yield (item index, record) for each (cell, sample) item as workers finish them; each worker
    decodes up to `batch` samples of a cell together."""
    try:
        import ray
        from ray.util import ActorPool
    except ImportError:
        raise KvrtError("--ray needs Ray: pip install 'kvrt[ray]'") from None
    if not ray.is_initialized():
        if address == "local":
            ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False)
        else:
            try:
                ray.init(address=address, include_dashboard=False, log_to_driver=False)
            except ConnectionError as exc:
                raise KvrtError(f"cannot reach a Ray cluster at '{address}': {exc}") from None

    @ray.remote(num_cpus=1)
    class Worker:
        def __init__(self, model: str, backend: str, dtype):
            import kvrt

            self.model = kvrt.load(model, backend=backend, dtype=dtype)

        def run(self, jobs: list) -> list[tuple[int, dict]]:
            from kvrt.eval.runner import run_samples

            return run_samples(self.model, jobs)

    if not items:
        return
    from kvrt.eval.runner import batched_jobs

    groups = batched_jobs([(i, cell, sample) for i, (cell, sample) in enumerate(items)], batch)
    pool = ActorPool([Worker.remote(settings.model, settings.backend, settings.dtype)
                      for _ in range(min(workers, len(groups)))])
    for records in pool.map_unordered(lambda actor, group: actor.run.remote(group), groups):
        yield from records
