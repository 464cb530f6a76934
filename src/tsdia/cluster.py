"""The one place that reads the launcher's environment: torchrun, Slurm, or a plain single process.

Nothing else in tsdia reads `SLURM_*`, `RANK`, `WORLD_SIZE`, ... Everything downstream receives a
`ClusterEnvironment`.
"""

from __future__ import annotations

import os
import re
import socket
from collections.abc import Mapping
from dataclasses import dataclass

DEFAULT_PORT = 29500
CLAIM_TOKEN_VAR = "TSDIA_CLAIM_TOKEN"
# Set by the container job script: inside the container Slurm is out of reach, the script requeues.
SLURM_FROM_SCRIPT_VAR = "TSDIA_SLURM_FROM_SCRIPT"
_PORT_BASE, _PORT_SPAN = 20000, 20000  # ports derived from a Slurm job id land in [20000, 40000)


@dataclass(frozen=True)
class ClusterEnvironment:
    """Who this process is in the job."""

    launcher: str  # "single", "torchrun" or "slurm"
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    node_rank: int = 0
    num_nodes: int = 1
    master_addr: str = "127.0.0.1"
    master_port: int = DEFAULT_PORT
    job_id: str | None = None
    restart_count: int = 0
    claim_token: str | None = None  # set by tsdia-submit: proves this job owns its experiment directory
    master_addr_reason: str = ""  # how master_addr was chosen (printed in rank 0's log)
    nodes: tuple[str, ...] = ()  # the job's nodes (Slurm's node list; else this host): for attempts.json
    agent_store: bool = False  # torchrun's agent hosts the rendezvous store (rank 0 only connects to it)
    slurm_from_script: bool = False  # a container job: its batch script, not tsdia, talks to Slurm

    @property
    def talks_to_slurm(self) -> bool:
        """Whether tsdia itself may call scontrol for this job (ask why it stopped, requeue it)."""
        return self.job_id is not None and not self.slurm_from_script

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def torch_env(self) -> dict[str, str]:
        """The variables torch.distributed, Accelerate and DeepSpeed expect."""
        return {
            "RANK": str(self.rank),
            "WORLD_SIZE": str(self.world_size),
            "LOCAL_RANK": str(self.local_rank),
            "LOCAL_WORLD_SIZE": str(self.local_world_size),
            "NODE_RANK": str(self.node_rank),
            "MASTER_ADDR": self.master_addr,
            "MASTER_PORT": str(self.master_port),
        }


def detect(env: Mapping[str, str] | None = None) -> ClusterEnvironment:
    """Read the environment: torchrun's variables win, then a Slurm task, else a single process."""
    env = os.environ if env is None else env
    job_id = env.get("SLURM_ARRAY_JOB_ID") or env.get("SLURM_JOB_ID")
    if env.get("SLURM_ARRAY_TASK_ID") and env.get("SLURM_ARRAY_JOB_ID"):
        job_id = f"{env['SLURM_ARRAY_JOB_ID']}_{env['SLURM_ARRAY_TASK_ID']}"
    restart_count = int(env.get("SLURM_RESTART_COUNT", "0") or 0)
    token = env.get(CLAIM_TOKEN_VAR) or None
    job_nodes = _job_nodes(env)
    from_script = env.get(SLURM_FROM_SCRIPT_VAR) == "1"
    if "RANK" in env and "WORLD_SIZE" in env:
        world = int(env["WORLD_SIZE"])
        local_world = int(env.get("LOCAL_WORLD_SIZE", world))
        return ClusterEnvironment(
            launcher="torchrun",
            rank=int(env["RANK"]),
            world_size=world,
            local_rank=int(env.get("LOCAL_RANK", "0")),
            local_world_size=local_world,
            node_rank=int(env.get("GROUP_RANK", env.get("NODE_RANK", "0"))),
            num_nodes=max(1, world // max(local_world, 1)),
            master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
            master_port=int(env.get("MASTER_PORT", DEFAULT_PORT)),
            job_id=job_id,
            restart_count=restart_count,
            claim_token=token,
            nodes=job_nodes,
            agent_store=env.get("TORCHELASTIC_USE_AGENT_STORE") == "True",
            slurm_from_script=from_script,
        )
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env and _is_slurm_step(env):
        nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST") or ""
        try:
            nodes = expand_hostlist(nodelist)
        except ValueError:
            nodes = []
        if env.get("MASTER_ADDR"):
            master_addr, reason = env["MASTER_ADDR"], "MASTER_ADDR from the environment"
        else:
            master_addr, reason = _master_address(nodes, nodelist, env)
        return ClusterEnvironment(
            launcher="slurm",
            rank=int(env["SLURM_PROCID"]),
            world_size=int(env["SLURM_NTASKS"]),
            local_rank=int(env.get("SLURM_LOCALID", "0")),
            local_world_size=_tasks_on_this_node(env),
            node_rank=int(env.get("SLURM_NODEID", "0")),
            num_nodes=int(env.get("SLURM_JOB_NUM_NODES") or env.get("SLURM_NNODES") or len(nodes) or 1),
            master_addr=master_addr,
            master_addr_reason=reason,
            master_port=int(env.get("MASTER_PORT") or port_for_job(job_id)),
            job_id=job_id,
            restart_count=restart_count,
            claim_token=token,
            nodes=job_nodes,
            slurm_from_script=from_script,
        )
    return ClusterEnvironment(
        launcher="single",
        master_port=int(env.get("MASTER_PORT") or DEFAULT_PORT),
        job_id=job_id,
        restart_count=restart_count,
        claim_token=token,
        nodes=job_nodes,
        slurm_from_script=from_script,
    )


def _job_nodes(env: Mapping[str, str]) -> tuple[str, ...]:
    """Slurm's node list of the job when there is one, else this host's short name."""
    nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST") or ""
    if nodelist:
        try:
            return tuple(expand_hostlist(nodelist))
        except ValueError:
            pass
    return (socket.gethostname().split(".")[0],)


def _is_slurm_step(env: Mapping[str, str]) -> bool:
    """True inside an srun step (or a submitit task); the bare batch script is not a training rank."""
    return "SLURM_STEP_ID" in env or "SUBMITIT_EXECUTOR" in env or env.get("SLURM_NTASKS") == "1"


def _tasks_on_this_node(env: Mapping[str, str]) -> int:
    tasks = env.get("SLURM_NTASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE") or "1"
    match = re.match(r"\d+", tasks)
    return int(match.group()) if match else 1


def port_for_job(job_id: str | None) -> int:
    """A rendezvous port derived from the job id: the same on every node and after every requeue."""
    if not job_id:
        return DEFAULT_PORT
    digits = int(re.sub(r"\D", "", job_id) or "0")
    return _PORT_BASE + digits % _PORT_SPAN


def _master_address(nodes: list[str], nodelist: str, env: Mapping[str, str]) -> tuple[str, str]:
    """The first node of the allocation (where the batch script and rank 0 run), as an address, and why.

    A node name that does not resolve (some sites, or a local test cluster) falls back to the address
    of the node that launched the step, which Slurm gives us directly; the reason says so.
    """
    if not nodes:
        fallback = env.get("SLURM_LAUNCH_NODE_IPADDR") or "127.0.0.1"
        return fallback, f"could not read a node from SLURM_JOB_NODELIST={nodelist!r}: using {fallback}"
    try:
        address = socket.gethostbyname(nodes[0])
    except OSError as err:
        fallback = env.get("SLURM_LAUNCH_NODE_IPADDR") or nodes[0]
        why = f"first node {nodes[0]} of {nodelist} does not resolve ({err.strerror or err})"
        return fallback, f"{why}: using the launch node's address {fallback}"
    return address, f"first node {nodes[0]} of {nodelist} ({address})"


def expand_hostlist(hostlist: str) -> list[str]:
    """Expand Slurm's compressed host list, as `scontrol show hostnames` does.

    `n[1-3,5],gpu7` -> n1 n2 n3 n5 gpu7; several bracket groups multiply, the first one outermost:
    `gpu[01-02]-ib[1-2]` -> gpu01-ib1 gpu01-ib2 gpu02-ib1 gpu02-ib2. Numbers keep the zero padding of
    the range's first bound.
    """
    hosts: list[str] = []
    for name in _split_top_level(hostlist):
        hosts.extend(_expand_name(name))
    return hosts


def _split_top_level(hostlist: str) -> list[str]:
    """Split on the commas that are not inside brackets."""
    names, depth, start = [], 0, 0
    for i, char in enumerate(hostlist):
        if char == "[":
            depth += 1
        elif char == "]":
            depth -= 1
        elif char == "," and depth == 0:
            names.append(hostlist[start:i])
            start = i + 1
    names.append(hostlist[start:])
    return [n.strip() for n in names if n.strip()]


def _expand_name(name: str) -> list[str]:
    match = re.search(r"\[([^\]]*)\]", name)
    if match is None:
        return [name]
    prefix, rest = name[: match.start()], name[match.end() :]
    tails = _expand_name(rest)
    out: list[str] = []
    for item in match.group(1).split(","):
        low, _, high = item.strip().partition("-")
        if not low.isdigit() or (high and not high.isdigit()):
            raise ValueError(f"not a Slurm host list: {name!r} (range {item!r})")
        for number in range(int(low), int(high or low) + 1):
            out.extend(f"{prefix}{number:0{len(low)}d}{tail}" for tail in tails)
    return out
