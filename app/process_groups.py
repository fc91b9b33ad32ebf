"""Process groups and parent-death signals, for code that starts trees of child processes.

PR_SET_PDEATHSIG: the kernel signals a child when the thread that started it dies, however it
died (kill -9 included). Linux only; elsewhere there is no such setting and children outlive a
killed parent. Group membership is read from /proc where there is one."""

from __future__ import annotations

import ctypes
import os
import sys
from collections.abc import Callable

# Linux prctl option (from <linux/prctl.h>): signal sent to us when our parent thread dies.
PR_SET_PDEATHSIG = 1


def parent_death_signal(sig: int) -> Callable[[], None] | None:
    """A preexec_fn that makes the child receive `sig` when its parent dies, or None off Linux.

    Call it in the thread that starts the child (the signal follows that thread's death). The
    kernel clears the setting on fork, so only the direct child is covered.
    """
    if not sys.platform.startswith("linux"):
        return None
    try:
        # Loaded here, in the parent: after fork the child should only call, not load.
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    parent_pid = os.getpid()
    signal_number = int(sig)

    def preexec() -> None:
        prctl(PR_SET_PDEATHSIG, signal_number, 0, 0, 0)
        # The parent may have died between fork and prctl; then no signal would ever come.
        if os.getppid() != parent_pid:
            os._exit(1)

    return preexec


def group_alive(pgid: int) -> bool:
    """True while a process of the group is alive (zombies do not count)."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # killpg() also succeeds when only zombies are left: orphaned grandchildren are reparented
    # to PID 1, and not every container's PID 1 reaps them. They hold no memory, so on Linux
    # look at /proc and count only members that are not zombies.
    if not os.path.isdir("/proc/self"):
        return True
    return bool(live_group_members(pgid))


def live_group_members(pgid: int) -> list[int]:
    """pids of the group's members that are not zombies (Linux: read from /proc)."""
    members = []
    with os.scandir("/proc") as entries:
        for entry in entries:
            if not entry.name.isdigit():
                continue
            try:
                with open(f"/proc/{entry.name}/stat", "rb") as f:
                    stat = f.read()
            except OSError:  # exited while we looked
                continue
            # Fields after the command name, which is in parentheses and may contain spaces:
            # state, ppid, pgrp, ...
            fields = stat[stat.rfind(b")") + 2 :].split()
            if len(fields) >= 3 and int(fields[2]) == pgid and fields[0] not in (b"Z", b"X"):
                members.append(int(entry.name))
    return members
