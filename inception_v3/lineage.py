"""Which processes belong to a launcher, so that none outlives it.

Every process the launcher starts carries a mark in its environment,
``INCEPTION_V3_LAUNCHER=<launcher pid>:<start time>:<piece>/``, which whatever it
starts inherits; the launcher and its watchdog find a piece's or the whole stack's
processes by that mark, whatever their parent, process group or depth (BentoML's
circus supervisors, which this launcher no longer runs, put their workers in
sessions of their own: killed with SIGKILL, they left them running and holding the
ports).
"""

from __future__ import annotations

import ctypes
import os
import signal
from collections.abc import Iterator
from pathlib import Path

import psutil

MARK = "INCEPTION_V3_LAUNCHER"
PR_SET_PDEATHSIG = 1


def identity(process: psutil.Process) -> str:
    """``pid:start time``: a pid alone may be reused once its process is gone."""
    return f"{process.pid}:{process.create_time():.2f}"


def marked(prefix: str) -> Iterator[psutil.Process]:
    """Processes whose mark starts with ``prefix`` (other users' processes cannot be read, and are not ours)."""
    for process in psutil.process_iter():
        try:
            mark = process.environ().get(MARK)
            if mark is not None and mark.startswith(prefix):
                yield process
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue


def kill_marked(prefix: str) -> list[int]:
    """SIGKILL every process marked ``prefix...`` and wait for them; their pids."""
    processes = list(marked(prefix))
    for process in processes:
        try:
            process.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(processes, timeout=5)
    return [process.pid for process in processes]


def stale_leftovers(working_dir: Path) -> list[psutil.Process]:
    """Marked processes serving ``working_dir`` whose launcher is gone: what a crashed run left."""
    leftovers = []
    for process in marked(""):
        try:
            launcher_pid, start_time, _piece = process.environ()[MARK].split(":", 2)
            if Path(process.cwd()) != working_dir:
                continue
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess, ValueError):
            continue
        try:
            alive = identity(psutil.Process(int(launcher_pid))) == f"{launcher_pid}:{start_time}"
        except psutil.NoSuchProcess:
            alive = False
        if not alive:
            leftovers.append(process)
    return leftovers


def die_with_parent(parent_pid: int) -> None:
    """For ``preexec_fn``: SIGKILL this child when its parent dies (and now, if it already has)."""
    if ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL) != 0:
        os._exit(1)
    if os.getppid() != parent_pid:
        os._exit(1)


def start_watchdog(prefix: str) -> None:
    """Fork a process that kills everything marked ``prefix...`` once this process is gone, SIGKILL included.

    It waits on a pipe only this process writes to: the end of file comes when
    this process exits, however it exits. Forked before any thread or server
    exists; it ignores the signals an operator sends to the whole group.
    """
    read_end, write_end = os.pipe()
    if os.fork() > 0:
        os.close(read_end)  # the write end stays open, and out of every child (pipes are not inherited)
        return
    try:
        os.close(write_end)
        for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(signum, signal.SIG_IGN)
        while os.read(read_end, 1):
            pass
        kill_marked(prefix)
    finally:
        os._exit(0)


def port_holders(ports: list[int]) -> dict[int, psutil.Process | None]:
    """Which process listens on each of ``ports`` (None: one this user may not see)."""
    holders: dict[int, psutil.Process | None] = {}
    for connection in psutil.net_connections(kind="inet"):
        if connection.status == psutil.CONN_LISTEN and connection.laddr.port in ports:
            try:
                holders[connection.laddr.port] = psutil.Process(connection.pid) if connection.pid else None
            except psutil.NoSuchProcess:
                continue
    return holders
