"""How much memory this process may use: the host's, or less where a control group limits it.

A server in a container sees the host's physical memory through ``sysconf``, not its container's limit:
on a 1 TiB node a pod limited to 32 GiB would take half a terabyte as its memory budget, admit calls far
past its limit, and be killed by the kernel with every caller's calls in it. So the default budget is
half of the least of the host's memory and every memory limit on this process's control groups, v2
(``memory.max``) and v1 (``memory.limit_in_bytes``), on its own group and each group above it.

Reads ``/proc/self/mountinfo`` to find where each hierarchy is mounted and which group its mount shows as
its root (a container's own group, under a cgroup namespace or Docker's bind mount), and
``/proc/self/cgroup`` for this process's group in each. Importing it costs nothing (no torch, no gRPC);
``root`` lets the tests read a made-up tree.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator

V2_LIMIT = "memory.max"
V1_LIMIT = "memory.limit_in_bytes"


@dataclasses.dataclass(frozen=True)
class MemoryLimit:
    """The least memory bound found, and where it came from (for the log line that states the budget)."""

    bytes: int
    source: str  # "physical memory", or the limit file's path


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
    for path in _limit_files(root):
        size = _read_limit(path)
        if size is not None:
            found.append(MemoryLimit(size, path))
    return min(found, key=lambda limit: limit.bytes, default=None)


def _limit_files(root: str) -> Iterator[str]:
    """Every memory limit file that applies to this process: its own group's and each ancestor's up to the
    mount's root, in every hierarchy with a memory controller."""
    groups = _process_groups(_read(os.path.join(root, "proc/self/cgroup")))
    for mount_root, mount_point, kind in _memory_mounts(_read(os.path.join(root, "proc/self/mountinfo"))):
        group = groups.get(kind)
        if group is None:
            continue
        # the group relative to what the mount shows; a group outside it (a container without a cgroup
        # namespace may see the host's path of its own group) is the mount's root itself
        relative = os.path.relpath(group, mount_root) if _within(group, mount_root) else "."
        directory = os.path.normpath(os.path.join(root, mount_point.lstrip("/"), relative))
        top = os.path.normpath(os.path.join(root, mount_point.lstrip("/")))
        name = V2_LIMIT if kind == "v2" else V1_LIMIT
        while True:
            yield os.path.join(directory, name)
            if directory == top or not _within(directory, top):
                break
            directory = os.path.dirname(directory)


def _process_groups(text: str) -> dict[str, str]:
    """This process's group in the v2 hierarchy (``0::/path``) and in v1's memory hierarchy."""
    groups: dict[str, str] = {}
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        hierarchy, controllers, path = parts
        if hierarchy == "0" and controllers == "":
            groups["v2"] = path
        elif "memory" in controllers.split(","):
            groups["v1"] = path
    return groups


def _memory_mounts(text: str) -> Iterator[tuple[str, str, str]]:
    """(root within the hierarchy, mount point, "v1" or "v2") of each cgroup mount that limits memory."""
    for line in text.splitlines():
        before, separator, after = line.partition(" - ")
        fields, tail = before.split(), after.split()
        if not separator or len(fields) < 5 or len(tail) < 3:
            continue
        mount_root, mount_point = _unescape(fields[3]), _unescape(fields[4])
        if tail[0] == "cgroup2":
            yield mount_root, mount_point, "v2"
        elif tail[0] == "cgroup" and "memory" in tail[2].split(","):
            yield mount_root, mount_point, "v1"


def _read_limit(path: str) -> int | None:
    """A limit file's bytes; None for "max", a v1 "unlimited" (within a page of 2**63), or no file."""
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
