"""Which Ray a command uses, and how an embedded one is sized.

Policy (see ``shared/notes/ray_on_small_machines.md``): on a 2-core machine
``ray.init(num_cpus=2)`` with two 1-CPU Train workers deadlocks, because Ray Data's read
tasks never get a CPU. An *embedded* Ray therefore advertises more logical CPUs than
there are cores: enough for every Train worker plus ``DATA_CPUS`` for Ray Data, and never
fewer than the machine has. The OS time-shares the cores; each torch worker runs with
one thread so they do not fight. On a cluster (``--address`` / ``RAY_ADDRESS`` /
``runtime.address``) nothing is sized: the real resource counts apply.
"""

from __future__ import annotations

import logging
import os
import socket
from dataclasses import dataclass

from distributed_hte.errors import ClusterError

log = logging.getLogger(__name__)

# Logical CPUs kept free for Ray Data reads/transforms next to the Train workers.
DATA_CPUS = 2
# Workers prefix the lines meant for the user's terminal with this; everything else a
# Ray process prints (report dicts, checkpoint chatter, Ray's INFO lines) goes to run.log.
TERMINAL_TAG = "[dhte] "
# Logger for Ray's forwarded worker output: run.log keeps it, the terminal shows it only
# with --verbose.
RAY_OUTPUT_LOGGER = "distributed_hte.ray_output"
# Logger names the terminal hides unless --verbose (Ray's own, and Python warnings).
TERMINAL_HIDDEN = ("ray", "py.warnings", RAY_OUTPUT_LOGGER)
# How often Ray Train's controller polls the workers. A worker's report waits for the
# next poll (its result queue holds one), so Ray's default of 2 s made every sub-second
# epoch of a small job take 1-2 s of wall time.
TRAIN_POLL_INTERVAL_S = "0.2"
_TRAIN_POLL_ENV = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"
# Set by Ray's job supervisor for a submitted job's entrypoint (the job's config).
_SUBMITTED_JOB_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"


def job_env_vars() -> dict[str, str]:
    """Env vars every job's Ray processes get (the user's runtime_env env_vars win)."""
    return {_TRAIN_POLL_ENV: os.environ.get(_TRAIN_POLL_ENV, TRAIN_POLL_INTERVAL_S)}


def with_job_env(runtime_env: dict | None, **extra: str) -> dict:
    """``runtime_env`` plus :func:`job_env_vars` and ``extra`` under its ``env_vars``."""
    env = dict(runtime_env or {})
    env["env_vars"] = {**job_env_vars(), **extra, **env.get("env_vars", {})}
    return env


@dataclass(frozen=True)
class RayTarget:
    """Where to run: an existing cluster (``address``) or an embedded local Ray."""

    address: str | None
    num_cpus: int | None = None
    object_store_gb: float | None = None


def embedded_num_cpus(
    num_workers: int, cpus_per_worker: float = 1.0, concurrent_trials: int = 1
) -> int:
    """Logical CPUs for an embedded Ray that can run the workers and Ray Data at once."""
    needed = int(num_workers * cpus_per_worker * concurrent_trials + 0.999) + DATA_CPUS
    return max(os.cpu_count() or 1, needed)


def resolve_target(
    cli_address: str | None,
    spec_address: str | None,
    num_cpus: int | None,
    object_store_gb: float | None = None,
) -> RayTarget:
    """CLI address beats ``RAY_ADDRESS`` beats the spec; none of them means embedded."""
    address = cli_address or os.environ.get("RAY_ADDRESS") or spec_address
    return RayTarget(address=address or None, num_cpus=num_cpus, object_store_gb=object_store_gb)


def init_ray(target: RayTarget, runtime_env: dict | None = None) -> None:
    """Connect to or start Ray once per process. Unreachable clusters raise ClusterError."""
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    # Ray Data's own progress bars flood non-interactive logs; we print our own.
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    if target.address:
        check_reachable(target.address)
        try:
            # The entrypoint of a submitted job already runs in the job's runtime env
            # (`dhte submit` put the spec's and ours there); giving it again conflicts.
            submitted = _SUBMITTED_JOB_ENV in os.environ
            ray.init(
                address=target.address,
                runtime_env=None if submitted else with_job_env(runtime_env),
                log_to_driver=True,
            )
        except (ConnectionError, TimeoutError, RuntimeError) as exc:
            raise ClusterError(
                f"could not connect to the Ray cluster at {target.address}: {exc}"
            ) from exc
        log.info("connected to Ray at %s", target.address)
        route_ray_output()
        return
    num_cpus = target.num_cpus or embedded_num_cpus(2)
    dashboard_port = _free_port()
    ray.init(
        num_cpus=num_cpus,
        # Streaming buffers fill the object store up to Ray Data's budget, so this (not
        # the row count) bounds the peak memory of a large run.
        object_store_memory=int(target.object_store_gb * 2**30) if target.object_store_gb else None,
        # Ray Train V2's placement-group cleaner polls the State API, which the dashboard serves.
        include_dashboard=True,
        dashboard_host="127.0.0.1",
        dashboard_port=dashboard_port,
        # Ray Train V2's placement-group cleaner (a detached actor) finds the State API by
        # auto-detection, which fails with "Found multiple active Ray instances" when
        # another Ray runs on the machine; actors inherit the job's env vars, so naming
        # this Ray's own address there makes it find its own.
        runtime_env=with_job_env(
            runtime_env, RAY_API_SERVER_ADDRESS=f"http://127.0.0.1:{dashboard_port}"
        ),
        configure_logging=True,
        logging_level=logging.WARNING,
        log_to_driver=True,
    )
    log.info(
        "started an embedded Ray with %d logical CPUs on %d cores", num_cpus, os.cpu_count() or 1
    )
    _quiet_ray_data()
    route_ray_output()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def route_ray_output() -> None:
    """Send what Ray prints into our logging: lines tagged :data:`TERMINAL_TAG` under
    ``distributed_hte.worker`` (the terminal shows them), everything else under
    :data:`RAY_OUTPUT_LOGGER` (run.log keeps it; the terminal only with ``--verbose``).

    Replaces Ray's own printer of forwarded worker output and its console handlers on
    the driver, so Ray's INFO lines and warnings land in run.log too.
    """
    import ray._private.worker as ray_worker
    from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher

    dispatcher.remove_handler("ray_print_logs")
    # the raylet's warnings to the driver (e.g. "N worker processes have been started")
    # are printed by this function directly, not through the dispatcher
    ray_worker.print_to_stdstream = _print_to_stdstream
    dispatcher.remove_handler(_FORWARDER)
    dispatcher.add_handler(_FORWARDER, _forward_worker_output)
    for name in ("ray", "ray.data", "ray.train", "ray.tune"):
        logger = logging.getLogger(name)
        for handler in list(logger.handlers):
            if not isinstance(handler, logging.FileHandler):
                logger.removeHandler(handler)
        logger.propagate = True
        if logger.level < logging.INFO:
            logger.setLevel(logging.INFO)


_FORWARDER = "dhte_worker_output"
_worker_log = logging.getLogger("distributed_hte.worker")
_ray_output_log = logging.getLogger(RAY_OUTPUT_LOGGER)


def _print_to_stdstream(data: dict, ignore_prefix: bool = False) -> None:
    _forward_worker_output(data)


def _forward_worker_output(data: dict) -> None:
    source = data.get("actor_name") or data.get("task_name") or ""
    prefix = f"({source} pid={data.get('pid')}) " if source else f"(pid={data.get('pid')}) "
    for line in data.get("lines", []):
        if TERMINAL_TAG in line:
            _worker_log.info(line.split(TERMINAL_TAG, 1)[1])
        else:
            _ray_output_log.info("%s%s", prefix, line)


def configure_worker_logging(logger: logging.Logger) -> None:
    """In a Ray worker: print ``logger``'s INFO lines tagged for the user's terminal.

    The driver (:func:`route_ray_output`) strips the tag and stamps the time; the
    worker's other output goes to run.log.
    """
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter(TERMINAL_TAG + "%(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False


def _quiet_ray_data() -> None:
    from ray.data import DataContext

    ctx = DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False


def check_reachable(address: str) -> None:
    """Fail fast (seconds, not minutes of retries) when a host:port does not answer."""
    import socket
    from urllib.parse import urlparse

    if address == "auto" or address.startswith("local"):
        return
    parsed = urlparse(address if "://" in address else f"tcp://{address}")
    host, port = parsed.hostname, parsed.port
    if not host or not port:
        return
    try:
        with socket.create_connection((host, port), timeout=5):
            pass
    except OSError as exc:
        raise ClusterError(
            f"the Ray cluster at {address} is unreachable ({exc.strerror or exc}); check the address "
            "and that the head node is running (`ray status` on the head)"
        ) from exc


def shutdown_ray() -> None:
    """Stop the embedded Ray (or disconnect) if this process started one."""
    import ray

    if ray.is_initialized():
        ray.shutdown()
