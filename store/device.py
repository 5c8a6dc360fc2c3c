"""The soft gate of a pack's ``min_device``: does this machine meet it?

A manifest's ``min_device`` is free text (shown, never evaluated) or an object
(:class:`~store.manifest.MinDevice`) whose fields are checked here against this
machine:

    min_ram_bytes         MemTotal in /proc/meminfo
    min_free_disk_bytes   free space where the store keeps its blobs
    cpu_features          flags of /proc/cpuinfo (e.g. avx2, f16c)
    os_min                the kernel release on Linux, as dotted numbers (e.g. 6.1)
    gpu                   not knowable without a runtime: reported as unknown, never failing

It is a soft gate: a foreground pull warns and installs, a background install (a
channel update) skips the version. Pure reading of /proc and statvfs; every source can
be moved for tests.
"""

from __future__ import annotations

import os
import platform as platform_module
from dataclasses import dataclass
from pathlib import Path

from .manifest import MinDevice


@dataclass(frozen=True)
class Machine:
    """Where the facts come from (tests point these elsewhere)."""
    meminfo: Path = Path("/proc/meminfo")
    cpuinfo: Path = Path("/proc/cpuinfo")
    disk: Path = Path("/")
    release: str = platform_module.release()


def shortfalls(gate: MinDevice | str, machine: Machine) -> list[str]:
    """One line per field of ``gate`` this machine does not meet ([] when it meets
    every one, or when ``gate`` is free text)."""
    if isinstance(gate, str):
        return []
    out = []
    if gate.min_ram_bytes is not None and (ram := _ram(machine.meminfo)) is not None and ram < gate.min_ram_bytes:
        out.append(f"min_ram_bytes: needs {gate.min_ram_bytes}, this machine has {ram}")
    if gate.min_free_disk_bytes is not None:
        st = os.statvfs(machine.disk)
        free = st.f_bavail * st.f_frsize
        if free < gate.min_free_disk_bytes:
            out.append(f"min_free_disk_bytes: needs {gate.min_free_disk_bytes}, {free} free")
    missing = sorted(set(gate.cpu_features) - _cpu_flags(machine.cpuinfo))
    if missing:
        out.append(f"cpu_features: this CPU lacks {', '.join(missing)}")
    if gate.os_min is not None and _version(machine.release) < _version(gate.os_min):
        out.append(f"os_min: needs {gate.os_min}, this kernel is {machine.release}")
    return out


def _ram(meminfo: Path) -> int | None:
    try:
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _cpu_flags(cpuinfo: Path) -> set[str]:
    try:
        for line in cpuinfo.read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return set(line.split(":", 1)[1].split())
    except (OSError, IndexError):
        pass
    return set()


def _version(text: str) -> tuple[int, ...]:
    parts = []
    for part in text.split("-")[0].split("."):
        if not part.isdigit():
            break
        parts.append(int(part))
    return tuple(parts)
