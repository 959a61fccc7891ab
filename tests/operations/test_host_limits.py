"""The default memory budget and torch's threads follow a container's limits, not the host's memory and cores.

First the reading of control-group layouts, on made-up ``/proc`` and ``/sys`` trees (v2 under a cgroup
namespace, v2 nested as Kubernetes nests pods, v1 as Docker mounts it, hybrid hosts); then real server
processes started inside limited control groups of this machine (root only): a memory limit, whose
budget must be half of it, and a CPU quota, whose torch threads must be the quota rounded up.
"""

from __future__ import annotations

import contextlib
import os
import re
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.servers import START_TIMEOUT, ServerProcess, module_cmd, server_env

from losswire.server.host_limits import cpu_limit, memory_limit, physical_memory

GIB = 1 << 30
V1_UNLIMITED = "9223372036854771712"


def tree(root: Path, cgroup: str, mountinfo: list[str], files: dict[str, str]) -> str:
    """A made-up root: /proc/self/cgroup, /proc/self/mountinfo, and limit files under it."""
    (root / "proc/self").mkdir(parents=True)
    (root / "proc/self/cgroup").write_text(cgroup)
    (root / "proc/self/mountinfo").write_text("".join(line + "\n" for line in mountinfo))
    for path, text in files.items():
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_text(text + "\n")
    return str(root)


def mount(number: int, mount_root: str, mount_point: str, kind: str, options: str = "rw") -> str:
    """One mountinfo line of a cgroup file system."""
    fstype = "cgroup2" if kind == "v2" else "cgroup"
    return f"{number} 1 0:{number} {mount_root} {mount_point} rw,nosuid - {fstype} cgroup {options}"


def test_cgroup_v2_under_a_namespace_reads_the_container_s_own_limit(tmp_path):
    root = tree(
        tmp_path,
        "0::/\n",
        [mount(30, "/", "/sys/fs/cgroup", "v2")],
        {"sys/fs/cgroup/memory.max": str(4 * GIB)},
    )
    limit = memory_limit(root)
    assert limit.bytes == 4 * GIB
    assert limit.source == os.path.join(root, "sys/fs/cgroup/memory.max")


def test_cgroup_v2_takes_the_least_limit_of_the_group_and_every_group_above_it(tmp_path):
    # a pod's limit sits on the pod's group; the container's group below it says "max"
    root = tree(
        tmp_path,
        "0::/kubepods/pod1/container1\n",
        [mount(30, "/", "/sys/fs/cgroup", "v2")],
        {
            "sys/fs/cgroup/kubepods/memory.max": str(12 * GIB),
            "sys/fs/cgroup/kubepods/pod1/memory.max": str(2 * GIB),
            "sys/fs/cgroup/kubepods/pod1/container1/memory.max": "max",
        },
    )
    limit = memory_limit(root)
    assert limit.bytes == 2 * GIB
    assert limit.source.endswith("kubepods/pod1/memory.max")


def test_cgroup_v1_as_docker_mounts_it_without_a_namespace(tmp_path):
    # /proc/self/cgroup names the host's path of the container's group; the mount shows that group as its root
    root = tree(
        tmp_path,
        "12:pids:/docker/abc\n4:memory:/docker/abc\n1:name=systemd:/docker/abc\n0::/\n",
        [
            mount(40, "/docker/abc", "/sys/fs/cgroup/memory", "v1", "rw,memory"),
            mount(41, "/docker/abc", "/sys/fs/cgroup/pids", "v1", "rw,pids"),
        ],
        {"sys/fs/cgroup/memory/memory.limit_in_bytes": str(GIB), "sys/fs/cgroup/pids/pids.max": "max"},
    )
    assert memory_limit(root).bytes == GIB


def test_a_group_outside_the_mount_s_root_reads_the_mount_s_root(tmp_path):
    root = tree(
        tmp_path,
        "4:cpu,memory:/elsewhere/job\n",
        [mount(40, "/docker/abc", "/sys/fs/cgroup/memory", "v1", "rw,cpu,memory")],
        {"sys/fs/cgroup/memory/memory.limit_in_bytes": str(3 * GIB)},
    )
    assert memory_limit(root).bytes == 3 * GIB


def test_hybrid_hosts_read_v1_s_memory_controller_and_a_v2_tree_without_limits(tmp_path):
    root = tree(
        tmp_path,
        "4:memory:/job\n0::/job\n",
        [
            mount(40, "/", "/sys/fs/cgroup/memory", "v1", "rw,memory"),
            mount(41, "/", "/sys/fs/cgroup/unified", "v2"),
        ],
        {"sys/fs/cgroup/memory/job/memory.limit_in_bytes": str(5 * GIB), "sys/fs/cgroup/unified/job/cgroup.procs": ""},
    )
    assert memory_limit(root).bytes == 5 * GIB


def test_a_mount_point_with_a_space_is_unescaped(tmp_path):
    root = tree(
        tmp_path,
        "0::/\n",
        [mount(30, "/", "/sys/fs/cgroup\\040v2", "v2")],
        {"sys/fs/cgroup v2/memory.max": str(GIB)},
    )
    assert memory_limit(root).bytes == GIB


@pytest.mark.parametrize("text", ["max", V1_UNLIMITED, "", "-1", "12 GiB", "\x00\xff"])
def test_no_limit_or_an_unreadable_one_leaves_the_host_s_memory(tmp_path, text):
    root = tree(
        tmp_path,
        "4:memory:/\n0::/\n",
        [mount(40, "/", "/sys/fs/cgroup/memory", "v1", "rw,memory"), mount(41, "/", "/sys/fs/cgroup/unified", "v2")],
        {"sys/fs/cgroup/memory/memory.limit_in_bytes": text, "sys/fs/cgroup/unified/memory.max": text},
    )
    assert memory_limit(root).bytes == physical_memory()
    assert memory_limit(root).source == "physical memory"


def test_no_proc_at_all_leaves_the_host_s_memory(tmp_path):
    assert memory_limit(str(tmp_path)).bytes == physical_memory()


def test_a_limit_above_the_host_s_memory_is_not_taken(tmp_path):
    root = tree(
        tmp_path,
        "0::/\n",
        [mount(30, "/", "/sys/fs/cgroup", "v2")],
        {"sys/fs/cgroup/memory.max": str(physical_memory() * 4)},
    )
    assert memory_limit(root).source == "physical memory"


def test_cpu_quota_v2_takes_the_least_quota_of_the_group_and_the_groups_above(tmp_path):
    root = tree(
        tmp_path,
        "0::/kubepods/pod1/container1\n",
        [mount(30, "/", "/sys/fs/cgroup", "v2")],
        {
            "sys/fs/cgroup/kubepods/cpu.max": "max 100000",
            "sys/fs/cgroup/kubepods/pod1/cpu.max": "150000 100000",
            "sys/fs/cgroup/kubepods/pod1/container1/cpu.max": "400000 100000",
        },
    )
    limit = cpu_limit(root)
    assert (limit.cpus, limit.threads) == (1.5, 2)
    assert limit.source.endswith("kubepods/pod1/cpu.max")


def test_cpu_quota_v1_reads_quota_and_period_of_docker_s_cpu_mount(tmp_path):
    root = tree(
        tmp_path,
        "3:cpu,cpuacct:/docker/abc\n0::/\n",
        [mount(40, "/docker/abc", "/sys/fs/cgroup/cpu,cpuacct", "v1", "rw,cpu,cpuacct")],
        {
            "sys/fs/cgroup/cpu,cpuacct/cpu.cfs_quota_us": "25000",
            "sys/fs/cgroup/cpu,cpuacct/cpu.cfs_period_us": "100000",
        },
    )
    limit = cpu_limit(root)
    assert (limit.cpus, limit.threads) == (0.25, 1)


@pytest.mark.parametrize("quota", ["max 100000", "-1", "", "0 100000", "100000 0", "junk"])
def test_no_cpu_quota_or_an_unreadable_one_is_none(tmp_path, quota):
    v1 = quota if " " not in quota else quota.split()[0]
    root = tree(
        tmp_path,
        "1:cpu:/job\n0::/job\n",
        [mount(40, "/", "/sys/fs/cgroup/cpu", "v1", "rw,cpu"), mount(41, "/", "/sys/fs/cgroup/unified", "v2")],
        {
            "sys/fs/cgroup/cpu/job/cpu.cfs_quota_us": v1,
            "sys/fs/cgroup/cpu/job/cpu.cfs_period_us": "100000" if quota != "100000 0" else "0",
            "sys/fs/cgroup/unified/job/cpu.max": quota,
        },
    )
    assert cpu_limit(root) is None


# -- real servers in limited groups ---------------------------------------------------------------


def _v1_group(controller: str) -> Path | None:
    """This process's own v1 group directory of ``controller``, where the machine has one and it is writable."""
    own = None
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _hierarchy, controllers, path = line.split(":", 2)
        if controller in controllers.split(","):
            own = path
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        before, _, after = line.partition(" - ")
        fields, tail = before.split(), after.split()
        if own is not None and len(tail) >= 3 and tail[0] == "cgroup" and controller in tail[2].split(","):
            relative = os.path.relpath(own, fields[3]) if own.startswith(fields[3]) else "."
            group = Path(fields[4]) / relative
            return group if os.access(group, os.W_OK) else None
    return None


@contextlib.contextmanager
def child_group(controller: str, settings: dict[str, str]) -> Iterator[Path]:
    """A child of this process's v1 ``controller`` group with ``settings`` written (skipped where none can be
    made), removed afterwards."""
    parent = _v1_group(controller) if os.geteuid() == 0 else None
    if parent is None:
        pytest.skip(f"needs root and a writable cgroup v1 {controller} hierarchy to make a limited group")
    group = parent / f"losswire-test-{os.getpid()}"
    try:
        group.mkdir()
        for name, value in settings.items():
            (group / name).write_text(value)
    except OSError as error:
        with contextlib.suppress(OSError):
            group.rmdir()
        pytest.skip(f"cannot make a limited {controller} group here: {error}")
    try:
        yield group
    finally:
        group.rmdir()


def server_in(group: Path) -> ServerProcess:
    """A server process that enters ``group`` before it starts, as a container's process starts in its own."""
    enter = ["sh", "-c", 'echo $$ > "$0" && exec "$@"', str(group / "cgroup.procs")]
    argv = enter + module_cmd("--host", "127.0.0.1", "--port", "0", "--device", "cpu", "--metrics-port", "0")
    return ServerProcess(argv, server_env())


@pytest.mark.slow
def test_a_server_in_a_memory_limited_container_budgets_half_its_limit():
    with child_group("memory", {"memory.limit_in_bytes": str(2 * GIB)}) as group:
        process = server_in(group)
        try:
            process.wait_started()
            line = process.wait_for(r"memory budget for calls in flight: .*", START_TIMEOUT).group(0)
            assert "1.0 GiB; idle buffers 0.2 GiB; this process may use 2.0 GiB" in line
            assert str(group / "memory.limit_in_bytes") in line
            metrics_port = int(process.wait_for(r"metrics on http://[\d.]+:(\d+)/metrics", START_TIMEOUT).group(1))
            with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as answer:
                text = answer.read().decode()
            budget = re.search(r'losswire_bound_limit\{bound="memory_budget_bytes"\} (\S+)', text)
            assert budget is not None and float(budget.group(1)) == GIB
        finally:
            process.close()


@pytest.mark.slow
def test_a_server_under_a_cpu_quota_runs_torch_on_as_many_threads_as_the_quota_allows():
    # half a CPU (50 ms of every 100 ms): one thread; torch's default here is one per core
    with child_group("cpu", {"cpu.cfs_period_us": "100000", "cpu.cfs_quota_us": "50000"}) as group:
        process = server_in(group)
        try:
            process.wait_started()
            line = process.wait_for(r"torch threads: .*", START_TIMEOUT).group(0)
            assert f"torch threads: 1 (a CPU quota of 0.5 CPUs, {group / 'cpu.cfs_quota_us'})" in line
        finally:
            process.close()
