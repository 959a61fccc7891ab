"""What this process may use of its host: memory and CPUs, the host's, or less where a control group limits it.

A server in a container sees the host through ``sysconf`` and torch's core count, not its container's
limits. On a 1 TiB node a pod limited to 32 GiB would take half a terabyte as its memory budget, admit
calls far past its limit, and be killed by the kernel with every caller's calls in it; and a pod given 4
CPUs of a 64-core node would run torch's kernels on 64 threads that use up the pod's CPU time in a few
milliseconds of each period and then all wait out the rest, every call with them. So the server reads the
limits of its own control group and of each group above it, cgroup v2 (``memory.max``, ``cpu.max``) and
v1 (``memory.limit_in_bytes``, ``cpu.cfs_quota_us`` / ``cpu.cfs_period_us``), and takes the least.

Reads ``/proc/self/mountinfo`` to find where each hierarchy is mounted and which group its mount shows as
its root (a container's own group, under a cgroup namespace or Docker's bind mount), and
``/proc/self/cgroup`` for this process's group in each. Importing it costs nothing (no torch, no gRPC);
``root`` lets the tests read a made-up tree.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Iterator


@dataclasses.dataclass(frozen=True)
class MemoryLimit:
    """The least memory bound found, and where it came from (for the log line that states the budget)."""

    bytes: int
    source: str  # "physical memory", or the limit file's path


@dataclasses.dataclass(frozen=True)
class CpuLimit:
    """The least CPU quota found: CPUs' worth of time per period, and the file it came from."""

    cpus: float
    source: str

    @property
    def threads(self) -> int:
        """Threads that can all run through a period: the quota rounded up (1.5 CPUs: 2)."""
        return max(1, math.ceil(self.cpus))


def physical_memory() -> int | None:
    """The host's physical memory in bytes (None where the system does not say)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def memory_limit(root: str = "/") -> MemoryLimit | None:
    """The least of the host's physical memory and this process's control-group memory limits (None: no
    bound known)."""
    found = [MemoryLimit(size, "physical memory")] if (size := physical_memory()) else []
    for directory, version in _groups(root, "memory"):
        path = os.path.join(directory, "memory.max" if version == 2 else "memory.limit_in_bytes")
        size = _read_bytes(path)
        if size is not None:
            found.append(MemoryLimit(size, path))
    return min(found, key=lambda limit: limit.bytes, default=None)


def cpu_limit(root: str = "/") -> CpuLimit | None:
    """The least CPU quota on this process's control groups (None: no quota, the host's CPUs)."""
    found = []
    for directory, version in _groups(root, "cpu"):
        if version == 2:
            path = os.path.join(directory, "cpu.max")
            quota, period = [*_read(path).split(), "", ""][:2]
        else:
            path = os.path.join(directory, "cpu.cfs_quota_us")
            quota, period = _read(path).strip(), _read(os.path.join(directory, "cpu.cfs_period_us")).strip()
        if quota.isdigit() and period.isdigit() and int(quota) > 0 and int(period) > 0:
            found.append(CpuLimit(int(quota) / int(period), path))  # "max" or v1's -1: no quota
    return min(found, key=lambda limit: limit.cpus, default=None)


def _groups(root: str, controller: str) -> Iterator[tuple[str, int]]:
    """The directories of this process's group and each group above it, up to the mount's root, in every
    hierarchy that can hold ``controller``'s limits, with the hierarchy's version (1 or 2)."""
    groups = _process_groups(_read(os.path.join(root, "proc/self/cgroup")), controller)
    for mount_root, mount_point, version in _mounts(_read(os.path.join(root, "proc/self/mountinfo")), controller):
        group = groups.get(version)
        if group is None:
            continue
        # the group relative to what the mount shows; a group outside it (a container without a cgroup
        # namespace may see the host's path of its own group) is the mount's root itself
        relative = os.path.relpath(group, mount_root) if _within(group, mount_root) else "."
        top = os.path.normpath(os.path.join(root, mount_point.lstrip("/")))
        directory = os.path.normpath(os.path.join(top, relative))
        while True:
            yield directory, version
            if directory == top or not _within(directory, top):
                break
            directory = os.path.dirname(directory)


def _process_groups(text: str, controller: str) -> dict[int, str]:
    """This process's group in the v2 hierarchy (``0::/path``) and in v1's hierarchy of ``controller``."""
    groups: dict[int, str] = {}
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        hierarchy, controllers, path = parts
        if hierarchy == "0" and controllers == "":
            groups[2] = path
        elif controller in controllers.split(","):
            groups[1] = path
    return groups


def _mounts(text: str, controller: str) -> Iterator[tuple[str, str, int]]:
    """(root within the hierarchy, mount point, version) of each cgroup mount that can limit ``controller``."""
    for line in text.splitlines():
        before, separator, after = line.partition(" - ")
        fields, tail = before.split(), after.split()
        if not separator or len(fields) < 5 or len(tail) < 3:
            continue
        mount_root, mount_point = _unescape(fields[3]), _unescape(fields[4])
        if tail[0] == "cgroup2":
            yield mount_root, mount_point, 2
        elif tail[0] == "cgroup" and controller in tail[2].split(","):
            yield mount_root, mount_point, 1


def _read_bytes(path: str) -> int | None:
    """A memory limit file's bytes; None for "max", a v1 "unlimited" (within a page of 2**63), or no file."""
    text = _read(path).strip()
    if not text.isdigit():
        return None
    size = int(text)
    return None if size >= (1 << 63) - (1 << 16) else size


def _read(path: str) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as file:
            return file.read(1 << 20)
    except OSError:
        return ""


def _within(path: str, top: str) -> bool:
    return path == top or path.startswith(top.rstrip("/") + "/")


def _unescape(field: str) -> str:
    """mountinfo writes a space, tab, newline and backslash in a path as octal escapes."""
    for escaped, plain in (("\\040", " "), ("\\011", "\t"), ("\\012", "\n"), ("\\134", "\\")):
        field = field.replace(escaped, plain)
    return field
