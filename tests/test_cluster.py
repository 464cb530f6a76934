"""The one reader of launcher variables: torchrun, Slurm tasks, a plain process."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from tsdia.cluster import detect, expand_hostlist, port_for_job


def test_single_process() -> None:
    env = detect({})
    assert env.launcher == "single" and env.rank == 0 and env.world_size == 1 and not env.distributed


def test_torchrun_variables() -> None:
    env = detect(
        {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "h1"}
    )
    assert (env.launcher, env.rank, env.world_size, env.local_rank, env.num_nodes) == ("torchrun", 3, 4, 1, 2)
    assert env.master_addr == "h1" and not env.is_main


def test_slurm_task_variables() -> None:
    env = detect(
        {
            "SLURM_JOB_ID": "4711",
            "SLURM_PROCID": "2",
            "SLURM_NTASKS": "4",
            "SLURM_LOCALID": "0",
            "SLURM_NODEID": "1",
            "SLURM_STEP_ID": "0",
            "SLURM_JOB_NUM_NODES": "2",
            "SLURM_TASKS_PER_NODE": "2(x2)",
            "SLURM_JOB_NODELIST": "localhost,nonexistent-node-x",
            "SLURM_RESTART_COUNT": "2",
            "TSDIA_CLAIM_TOKEN": "abc",
        }
    )
    assert (env.launcher, env.rank, env.world_size, env.local_rank, env.node_rank) == ("slurm", 2, 4, 0, 1)
    assert env.local_world_size == 2 and env.num_nodes == 2 and env.restart_count == 2
    assert env.master_addr == "127.0.0.1"  # first host of the node list, resolved
    assert env.master_port == port_for_job("4711") and env.claim_token == "abc"
    assert env.torch_env()["MASTER_PORT"] == str(env.master_port)


def test_unresolvable_node_falls_back_to_launch_node_address() -> None:
    env = detect(
        {
            "SLURM_JOB_ID": "9",
            "SLURM_PROCID": "1",
            "SLURM_NTASKS": "2",
            "SLURM_STEP_ID": "0",
            "SLURM_JOB_NODELIST": "no-such-node-[1-2]",
            "SLURM_LAUNCH_NODE_IPADDR": "10.1.2.3",
        }
    )
    assert env.master_addr == "10.1.2.3"


def test_slurm_batch_script_is_not_a_rank() -> None:
    # The batch shell of a 4-task job (no step id) must not pretend to be rank 0 of 4.
    env = detect({"SLURM_JOB_ID": "1", "SLURM_PROCID": "0", "SLURM_NTASKS": "4"})
    assert env.launcher == "single" and env.job_id == "1"


def test_port_is_stable_per_job_and_in_range() -> None:
    assert port_for_job("123456") == port_for_job("123456")
    assert port_for_job("123456") != port_for_job("123457")
    assert all(20000 <= port_for_job(str(j)) < 40000 for j in range(0, 10**6, 99991))


@pytest.mark.parametrize(
    ("hostlist", "hosts"),
    [
        ("n1", ["n1"]),
        ("n[1-3]", ["n1", "n2", "n3"]),
        ("gpu[01-02,07],cpu5", ["gpu01", "gpu02", "gpu07", "cpu5"]),
        ("a[8-10]-ib", ["a8-ib", "a9-ib", "a10-ib"]),
        ("gpu[01-02]-ib[1-2]", ["gpu01-ib1", "gpu01-ib2", "gpu02-ib1", "gpu02-ib2"]),
        ("rack[1-2]-n[09-10],login", ["rack1-n09", "rack1-n10", "rack2-n09", "rack2-n10", "login"]),
        ("x-[7]", ["x-7"]),
    ],
)
def test_expand_hostlist(hostlist: str, hosts: list[str]) -> None:
    assert expand_hostlist(hostlist) == hosts


# Patterns the local cluster's scontrol accepts: several bracket groups, padding, lists, plain names.
SLURM_PATTERNS = [
    "n1",
    "n[1-3,5],gpu7",
    "gpu[01-02]-ib[1-2]",
    "rack[1-2]-n[01-02],login",
    "a[1-2]b[3-4]",
    "a[8-10]",
    "node[001-003,010]",
    "c[1-2]-[3-4]",
]


@pytest.mark.slurm
@pytest.mark.parametrize("hostlist", SLURM_PATTERNS)
def test_expand_hostlist_agrees_with_scontrol(hostlist: str) -> None:
    if shutil.which("scontrol") is None:
        pytest.skip("no scontrol: slurm/dev-cluster.sh start installs it")
    done = subprocess.run(
        ["scontrol", "show", "hostnames", hostlist], capture_output=True, text=True, timeout=30
    )
    if done.returncode != 0:
        pytest.skip(f"this Slurm rejects {hostlist!r}: {done.stderr.strip()}")
    assert expand_hostlist(hostlist) == done.stdout.split()


def test_unresolvable_first_node_falls_back_to_the_launch_node_and_says_so() -> None:
    env = detect(
        {
            "SLURM_JOB_ID": "7",
            "SLURM_PROCID": "1",
            "SLURM_NTASKS": "2",
            "SLURM_STEP_ID": "0",
            "SLURM_JOB_NODELIST": "no-such-host-tsdia[1-2]",
            "SLURM_LAUNCH_NODE_IPADDR": "10.1.2.3",
        }
    )
    assert env.master_addr == "10.1.2.3"
    assert "no-such-host-tsdia1" in env.master_addr_reason and "10.1.2.3" in env.master_addr_reason
