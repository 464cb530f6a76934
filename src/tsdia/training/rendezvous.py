"""The distributed start-up check: every rank joins, or the run fails in time saying who is missing.

torch's own rendezvous (`init_process_group`) either works or waits until its timeout and then says
neither where it waited nor for whom. Here rank 0 hosts the TCPStore (as torch's `env://` would, or
torchrun's agent does), every rank writes an arrival key, and rank 0 waits for all of them, at most
`distributed.timeout_s`. Then the process group is built on that same store (Accelerate and DeepSpeed
reuse an initialised group), one small all-reduce proves that collectives work, and rank 0 can report
world size, devices per node, backend and how long the rendezvous took.
"""

from __future__ import annotations

import os
import socket
import time
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from tsdia.cluster import ClusterEnvironment
from tsdia.config.schema import Config
from tsdia.errors import TsdiaError

_ARRIVED = "tsdia/arrived/"
_POLL_S = 0.1


class DistributedStartupError(TsdiaError, RuntimeError):
    """A rank could not join the others (wrong address or port, a blocked port, a missing node)."""


@dataclass(frozen=True)
class StartupReport:
    """What rank 0 prints once every rank has joined."""

    world_size: int
    num_nodes: int
    processes_per_node: int
    devices_per_node: int  # GPUs visible on rank 0's node (0 on CPU)
    backend: str
    seconds: float
    address: str

    def line(self) -> str:
        devices = f"{self.devices_per_node} GPU(s)" if self.devices_per_node else "CPU only"
        return (
            f"Distributed start-up: world size {self.world_size} ({self.num_nodes} node(s) x "
            f"{self.processes_per_node} process(es)), devices per node: {devices}, backend {self.backend}, "
            f"rendezvous at {self.address} took {self.seconds:.2f} s; all-reduce check passed"
        )


def resolve_backend(config: Config) -> str:
    backend = config.distributed.backend
    if backend == "auto":
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    return backend


def apply_env(config: Config, cluster: ClusterEnvironment) -> None:
    """`distributed.env` and the launcher's rank variables, in this process, before any process group."""
    os.environ.update(config.distributed.env)
    if cluster.distributed:
        os.environ.update(cluster.torch_env())


def start_distributed(config: Config, cluster: ClusterEnvironment) -> StartupReport | None:
    """Join the process group (checked) on a multi-process run; None for a single process."""
    apply_env(config, cluster)
    if not cluster.distributed or dist.is_initialized():
        return None
    timeout_s = config.distributed.timeout_s
    backend = resolve_backend(config)
    started = time.monotonic()
    store = _open_store(cluster, timeout_s)
    _arrive(store, cluster, timeout_s, started)
    dist.init_process_group(
        backend=backend,
        store=store,
        rank=cluster.rank,
        world_size=cluster.world_size,
        timeout=timedelta(seconds=timeout_s),
    )
    device = torch.device("cuda", cluster.local_rank) if backend == "nccl" else torch.device("cpu")
    ones = torch.ones(1, device=device)
    dist.all_reduce(ones)
    if int(ones.item()) != cluster.world_size:
        raise DistributedStartupError(
            f"the start-up all-reduce summed to {int(ones.item())} instead of the world size "
            f"{cluster.world_size}: the ranks are not one process group (check RANK/WORLD_SIZE per task)."
        )
    return StartupReport(
        world_size=cluster.world_size,
        num_nodes=cluster.num_nodes,
        processes_per_node=cluster.local_world_size,
        devices_per_node=torch.cuda.device_count() if torch.cuda.is_available() else 0,
        backend=backend,
        seconds=time.monotonic() - started,
        address=_address(cluster),
    )


def _address(cluster: ClusterEnvironment) -> str:
    return f"{cluster.master_addr}:{cluster.master_port}"


def _open_store(cluster: ClusterEnvironment, timeout_s: int) -> dist.TCPStore:
    """Rank 0 hosts the store (unless torchrun's agent already does); the others connect to it."""
    hosts = cluster.is_main and not cluster.agent_store
    if not hosts:
        _wait_until_reachable(cluster, timeout_s)
    try:
        return dist.TCPStore(
            cluster.master_addr,
            cluster.master_port,
            cluster.world_size,
            is_master=hosts,
            timeout=timedelta(seconds=timeout_s),
            wait_for_workers=False,
            multi_tenant=True,
        )
    except (RuntimeError, OSError) as err:  # DistNetworkError / DistStoreError are RuntimeErrors
        reason = _first_line(err)
        if hosts:
            raise DistributedStartupError(
                f"rank 0 could not open the rendezvous port {_address(cluster)} ({reason}). HINT: another "
                "job or run may use this port; set MASTER_PORT to a free one (under Slurm tsdia derives it "
                "from the job id)."
            ) from None
        raise DistributedStartupError(
            f"rank {cluster.rank} ({socket.gethostname()}) could not reach rank 0's rendezvous at "
            f"{_address(cluster)} within distributed.timeout_s={timeout_s} s ({reason}). HINT: check "
            f"MASTER_ADDR/MASTER_PORT ({cluster.master_addr_reason or cluster.launcher}), that rank 0's node "
            "is up and that no firewall blocks the port."
        ) from None


def _wait_until_reachable(cluster: ClusterEnvironment, timeout_s: int) -> None:
    """Probe rank 0's port until it answers: torch's own client retries past its timeout, with a C++
    stack trace per try, and its error does not say which address it tried."""
    deadline = time.monotonic() + timeout_s
    while True:
        left = deadline - time.monotonic()
        try:
            with socket.create_connection((cluster.master_addr, cluster.master_port), timeout=max(left, 0.1)):
                return
        except OSError as err:
            if time.monotonic() + 0.5 > deadline:
                raise DistributedStartupError(
                    f"rank {cluster.rank} ({socket.gethostname()}) could not reach rank 0's rendezvous at "
                    f"{_address(cluster)} within distributed.timeout_s={timeout_s} s ({err.strerror or err}). "
                    f"HINT: check MASTER_ADDR/MASTER_PORT ({cluster.master_addr_reason or cluster.launcher}), "
                    "that rank 0 started and its node is up, and that no firewall blocks the port."
                ) from None
            time.sleep(0.5)


def _arrive(store: dist.TCPStore, cluster: ClusterEnvironment, timeout_s: int, started: float) -> None:
    """Say this rank is here, then wait until every rank is (at most until the deadline)."""
    keys = [f"{_ARRIVED}{r}" for r in range(cluster.world_size)]
    try:
        store.set(keys[cluster.rank], socket.gethostname())
        deadline = started + timeout_s
        while not store.check(keys):
            if time.monotonic() > deadline:
                missing = [r for r, key in enumerate(keys) if not store.check([key])]
                raise DistributedStartupError(
                    f"rank(s) {_ranks(missing)} of {cluster.world_size} did not arrive at the rendezvous "
                    f"{_address(cluster)} within distributed.timeout_s={timeout_s} s (this is rank "
                    f"{cluster.rank} on {socket.gethostname()}). HINT: did their tasks start (see the "
                    "Slurm log)? Can their nodes reach MASTER_ADDR on that port (firewall, NCCL_SOCKET_IFNAME "
                    "in distributed.env)?"
                )
            time.sleep(_POLL_S)
    except (RuntimeError, OSError) as err:
        if isinstance(err, DistributedStartupError):
            raise
        raise DistributedStartupError(
            f"rank {cluster.rank} lost the rendezvous at {_address(cluster)} before every rank arrived "
            f"({_first_line(err)}); rank 0 has probably given up on a missing rank (see its log)."
        ) from None


def _ranks(ranks: list[int]) -> str:
    if len(ranks) > 16:
        return ", ".join(map(str, ranks[:16])) + f", ... ({len(ranks)} in all)"
    return ", ".join(map(str, ranks))


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__
