"""Where trials run: here, in threads of this process, or as Ray tasks on a cluster.

Each executor hands back a :class:`concurrent.futures.Future` per trial, so the search loop
is one loop whatever runs the trials. Threads suit this tool's trials: a merge spends its
time in torch kernels and file reads, and an eval command in its own process, neither
holding the GIL. Ray is imported only when asked for; each trial is a task asking for
``cpus_per_trial`` CPUs and ``gpus_per_trial`` GPUs (one by default where the cluster has
GPUs; Ray makes the task's own GPU the one it sees as ``cuda``), writing its candidate in the worker's
temporary directory and removing it once scored.
"""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, Protocol

from mergekit_like.errors import SearchError

if TYPE_CHECKING:
    from mergekit_like.search.runner import SearchSettings

# How long the search waits for a Ray cluster's address to answer. ray.init itself retries an
# unreachable address for minutes: the port is tried first, with this bound.
RAY_CONNECT_TIMEOUT = 10.0


class Executor(Protocol):
    concurrency: int  # trials in flight at once

    def submit(self, function: Callable[..., Any], *args: Any, **kwargs: Any) -> Future[Any]: ...


class _Threads:
    def __init__(self, pool: ThreadPoolExecutor, concurrency: int) -> None:
        self.pool = pool
        self.concurrency = concurrency

    def submit(self, function: Callable[..., Any], *args: Any, **kwargs: Any) -> Future[Any]:
        return self.pool.submit(function, *args, **kwargs)


class _RayTasks:
    def __init__(self, ray: Any, settings: SearchSettings) -> None:
        self.ray = ray
        self.cpus = settings.cpus_per_trial
        resources = ray.cluster_resources()
        # A trial merges and evaluates on one GPU where the cluster has them, unless told otherwise.
        self.gpus = settings.gpus_per_trial if settings.gpus_per_trial is not None else float(
            resources.get("GPU", 0) >= 1)
        fits = min(resources.get("CPU", 0) / self.cpus, resources.get("GPU", 0) / self.gpus if self.gpus else 1e9)
        if fits < 1:
            raise SearchError(f"the Ray cluster has {resources.get('CPU', 0):g} CPUs and {resources.get('GPU', 0):g} "
                              f"GPUs: not enough for one trial ({self.cpus:g} CPUs, {self.gpus:g} GPUs each)")
        self.concurrency = max(1, int(fits))
        self._remote: dict[Callable[..., Any], Any] = {}

    def submit(self, function: Callable[..., Any], *args: Any, **kwargs: Any) -> Future[Any]:
        remote = self._remote.get(function)
        if remote is None:
            remote = self._remote[function] = self.ray.remote(num_cpus=self.cpus, num_gpus=self.gpus)(function)
        future: Future[Any] = remote.remote(*args, **kwargs).future()
        return future


@contextlib.contextmanager
def make_executor(settings: SearchSettings) -> Iterator[Executor]:
    """The executor the settings ask for, shut down (or disconnected) on leaving."""
    if settings.ray_address is None:
        with ThreadPoolExecutor(settings.workers, thread_name_prefix="trial") as pool:
            yield _Threads(pool, settings.workers)
        return
    ray = _connect(settings.ray_address)
    try:
        yield _RayTasks(ray, settings)
    finally:
        ray.shutdown()


def _connect(address: str) -> Any:
    try:
        import ray
    except ImportError:
        raise SearchError("--ray-address needs Ray: pip install 'mergekit-like[distributed]'") from None
    if address != "auto":
        _check_reachable(address)
    try:
        ray.init(address=address, log_to_driver=False)
    except Exception as unreachable:  # Ray raises ConnectionError, RuntimeError or its own errors
        raise SearchError(f"cannot reach the Ray cluster at {address}: {type(unreachable).__name__}: "
                          f"{str(unreachable).splitlines()[0] if str(unreachable) else ''} (start one with "
                          f"'ray start --head', or check the address)") from None
    return ray


def _check_reachable(address: str) -> None:
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise SearchError(f"--ray-address must be auto or HOST:PORT, not {address!r}")
    try:
        socket.create_connection((host, int(port)), timeout=RAY_CONNECT_TIMEOUT).close()
    except OSError as unreachable:
        raise SearchError(f"cannot reach the Ray cluster at {address} within {RAY_CONNECT_TIMEOUT:g} s "
                          f"({unreachable.strerror or type(unreachable).__name__}); start one with "
                          f"'ray start --head', or check the address") from None
