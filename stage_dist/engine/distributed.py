"""Process-group setup and the few collectives the trainer and inference need.

Every entry point calls :func:`init_distributed`: under ``torchrun`` it reads ``RANK``,
``WORLD_SIZE`` and ``LOCAL_RANK``, binds the process to GPU ``LOCAL_RANK`` and joins an NCCL
(GPU) or gloo (CPU) process group; a plain ``python -m`` run is world size 1 and creates no
process group, so the helpers below degrade to no-ops. :func:`setup_logging` makes rank 0 the
only rank that logs at INFO and prefixes every line with its rank.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from stage_dist.core.config import DEFAULT_DIST_TIMEOUT_MINUTES
from stage_dist.core.errors import UserInputError

log = logging.getLogger(__name__)

LOG_FORMAT = "%(asctime)s [rank {rank}] %(levelname)s %(name)s: %(message)s"


class DistributedError(UserInputError):
    """The launch environment or the requested device is unusable."""


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits: its rank, the world size, and its device and backend.

    ``backend`` is ``None`` when no process group was created (world size 1 without torchrun).
    """

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str | None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.backend is not None and self.world_size > 1


def _env_int(name: str, default: int | None = None) -> int:
    raw = os.environ.get(name)
    if raw is None:
        if default is None:
            raise DistributedError(f"environment variable {name} is not set (launch with torchrun)")
        return default
    try:
        return int(raw)
    except ValueError:
        raise DistributedError(f"environment variable {name}={raw!r} is not an integer") from None


def _resolve_device(device: str, local_rank: int) -> torch.device:
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        return torch.device("cpu")
    if device != "cuda":
        raise DistributedError(f"device must be 'auto', 'cuda' or 'cpu', got {device!r}")
    if not torch.cuda.is_available():
        raise DistributedError("device 'cuda' requested but CUDA is not available")
    count = torch.cuda.device_count()
    if local_rank >= count:
        raise DistributedError(f"LOCAL_RANK={local_rank} but only {count} CUDA devices are visible")
    torch.cuda.set_device(local_rank)
    return torch.device("cuda", local_rank)


def _attempt_store(rank: int, world_size: int, timeout: timedelta) -> dist.Store:
    """The rendezvous store of this launch attempt: MASTER_ADDR:MASTER_PORT, keys prefixed by
    torchrun's restart count.

    With torch 2.13's default env:// rendezvous, gloo workers restarted by
    ``torchrun --max-restarts`` can read the dead workers' addresses and fail with
    "connectFullMesh failed ... Connection refused" (about one restart in three here); a
    per-attempt prefix makes every restart connect to the live workers.
    """
    master_addr = os.environ.get("MASTER_ADDR", "127.0.0.1")
    master_port = _env_int("MASTER_PORT", 29500)
    attempt = _env_int("TORCHELASTIC_RESTART_COUNT", 0)
    # torchrun's agent hosts the store; without torchrun (RANK etc. set by hand) rank 0 does.
    hosted_by_agent = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    store = dist.TCPStore(master_addr, master_port, world_size, is_master=not hosted_by_agent and rank == 0,
                          timeout=timeout)
    return dist.PrefixStore(f"stage_dist/attempt_{attempt}", store)


def init_distributed(device: str = "auto", timeout_minutes: float = DEFAULT_DIST_TIMEOUT_MINUTES) -> DistEnv:
    """Set up this process: torchrun's env gives rank and world size, else world size 1.

    ``device``: ``auto`` (CUDA when available), ``cuda`` or ``cpu``. On CUDA the process uses
    GPU ``LOCAL_RANK`` and NCCL (bound to it with ``device_id``); on CPU, gloo.
    ``timeout_minutes``: how long a collective (and the rendezvous) waits for the slowest rank
    before failing; long enough for rank 0's validation or a first ``--memmap-dir`` build.
    """
    if not timeout_minutes > 0:
        raise DistributedError(f"the distributed timeout must be > 0 minutes, got {timeout_minutes}")
    launched = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    rank = _env_int("RANK", 0) if launched else 0
    world_size = _env_int("WORLD_SIZE", 1) if launched else 1
    local_rank = _env_int("LOCAL_RANK", 0) if launched else 0
    if world_size < 1 or not 0 <= rank < world_size:
        raise DistributedError(f"invalid RANK={rank} for WORLD_SIZE={world_size}")
    resolved = _resolve_device(device, local_rank)
    backend = None
    if launched:
        options = process_group_options(resolved, timedelta(minutes=timeout_minutes))
        backend = options["backend"]
        if not dist.is_initialized():
            dist.init_process_group(store=_attempt_store(rank, world_size, options["timeout"]),
                                    rank=rank, world_size=world_size, **options)
    env = DistEnv(rank, world_size, local_rank, resolved, backend)
    log.debug("initialised %s", env)
    return env


def process_group_options(device: torch.device, timeout: timedelta) -> dict[str, Any]:
    """``init_process_group`` arguments for a rank on ``device``: NCCL bound to its GPU (``device_id``
    lets NCCL set up its communicator eagerly and skip guessing the device), gloo on CPU."""
    if device.type == "cuda":
        return {"backend": "nccl", "device_id": device, "timeout": timeout}
    return {"backend": "gloo", "timeout": timeout}


MAX_AUTO_WORKERS = 4  # loader workers per rank that ``--workers`` auto gives at most
CUBLAS_WORKSPACE = ":4096:8"  # CUBLAS_WORKSPACE_CONFIG that makes cuBLAS deterministic (CUDA >= 10.2)


def rank_cores(env: DistEnv) -> int:
    """This rank's share of the cores it may run on: ``os.sched_getaffinity`` (which honours a
    Slurm ``--cpus-per-task`` or ``taskset`` binding; ``os.cpu_count`` where it does not exist)
    split between the node's ranks (torchrun's ``LOCAL_WORLD_SIZE``); at least 1."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    ranks_on_node = max(1, _env_int("LOCAL_WORLD_SIZE", 1)) if env.distributed else 1
    return max(1, cores // ranks_on_node)


def loader_workers(requested: int | None, env: DistEnv) -> int:
    """DataLoader workers per rank: ``requested`` when given (``--workers N``), else (auto,
    ``None``) the rank's share of the cores less one for the rank itself, at most
    :data:`MAX_AUTO_WORKERS`; 0 (batches built in the rank's own process) when it has one core."""
    if requested is not None:
        return requested
    return max(0, min(MAX_AUTO_WORKERS, rank_cores(env) - 1))


def configure_threads(requested: int, env: DistEnv, workers: int | None) -> int:
    """Set this rank's intra-op threads; returns the count.

    ``requested`` > 0 is taken as is. 0 (auto) keeps ``OMP_NUM_THREADS`` when it is set (torchrun
    sets 1), else gives the rank its share of the cores (:func:`rank_cores`) less one per
    DataLoader worker (``workers`` as :func:`loader_workers` resolves it): oversubscribed CPU
    kernels run many times slower than they should.
    """
    if requested > 0:
        threads = requested
    elif "OMP_NUM_THREADS" in os.environ:
        return torch.get_num_threads()
    else:
        threads = max(1, rank_cores(env) - loader_workers(workers, env))
    torch.set_num_threads(threads)
    return threads


def configure_determinism(enabled: bool) -> None:
    """``--deterministic``: make every kernel deterministic or fail loudly.

    Sets ``CUBLAS_WORKSPACE_CONFIG`` (a value already in the environment is kept) in this process's
    environment, which cuBLAS reads when it creates a handle (at the first matmul on a device), so
    call this before any CUDA work (the entry points call it before :func:`init_distributed`); then
    ``torch.use_deterministic_algorithms(True)`` (an op with no deterministic kernel raises instead
    of running) and cuDNN without autotuning.
    What that buys on a GPU: two runs of the same config (and a run resumed from its checkpoint)
    give bitwise identical weights on the same GPU model, driver, CUDA/cuDNN/NCCL and torch
    versions and the same world size. Not across GPU models or software versions, not between
    CPU and GPU, and not across world sizes (the all-reduce sums in another order); ``--compile``
    is not covered (Inductor generates and autotunes its own kernels). On CPU the kernels are
    deterministic already: the flag changes no number there.
    """
    if not enabled:
        return
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE)
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True


def cleanup(env: DistEnv) -> None:
    """Leave the process group (if one was created)."""
    if env.backend is not None and dist.is_initialized():
        dist.destroy_process_group()


def barrier(env: DistEnv) -> None:
    """Wait for every rank (no-op at world size 1)."""
    if not env.distributed:
        return
    if env.backend == "nccl":
        dist.barrier(device_ids=[env.device.index])
    else:
        dist.barrier()


def gather_to_main(obj: Any, env: DistEnv) -> list | None:
    """Every rank's picklable ``obj`` on rank 0, in rank order; ``None`` on the other ranks.

    Objects travel pickled in one tensor per rank (numpy arrays pickle compactly), so large
    prediction arrays are fine with gloo and NCCL alike.
    """
    if not env.distributed:
        return [obj]
    gathered: list | None = [None] * env.world_size if env.is_main else None
    dist.gather_object(obj, gathered, dst=0)
    return gathered


def all_reduce_mean(value: float, env: DistEnv) -> float:
    """The mean of ``value`` over all ranks (``value`` itself at world size 1)."""
    if not env.distributed:
        return float(value)
    tensor = torch.tensor([float(value)], dtype=torch.float64, device=env.device)
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor.item() / env.world_size


def share_of_all(count: int, env: DistEnv) -> torch.Tensor:
    """``world_size x count / (sum of count over the ranks)`` on the device, with no host read: the
    weight that makes DDP's mean over ranks of per-rank means a mean over every rank's items (1 on
    one rank; 0 where every rank has none)."""
    if not env.distributed:
        return torch.ones((), dtype=torch.float32, device=env.device)
    mine = torch.tensor(float(count), dtype=torch.float32, device=env.device)
    total = mine.clone()
    dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return mine * env.world_size / total.clamp(min=1.0)


def all_reduce_min(tensor: torch.Tensor, env: DistEnv) -> torch.Tensor:
    """The element-wise minimum of ``tensor`` over all ranks (``tensor`` itself at world size 1)."""
    if not env.distributed:
        return tensor
    reduced = tensor.clone()
    dist.all_reduce(reduced, op=dist.ReduceOp.MIN)
    return reduced


def setup_logging(env: DistEnv, level: int = logging.INFO) -> None:
    """Root logging to stderr with a ``[rank r]`` prefix: rank 0 at ``level``, others at
    WARNING (or ``level`` if higher). Replaces handlers set up before."""
    rank_level = level if env.is_main else max(level, logging.WARNING)
    logging.basicConfig(level=rank_level, format=LOG_FORMAT.format(rank=env.rank), force=True)
