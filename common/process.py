"""What every Tessera process does at start: logging, uvloop, and dying with its parent.

Torch-free, shared by the gateway, tokenizer, scheduler and executor processes.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import os
import signal
import sys
import threading
import time

_PR_SET_PDEATHSIG = 1


def setup_logging(name: str, level: str | None = None) -> None:
    level = level or os.environ.get("TESSERA_LOG_LEVEL", "INFO")
    logging.basicConfig(
        level=level.upper(),
        format=f"%(asctime)s {name}[%(process)d] %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def install_uvloop() -> bool:
    try:
        import uvloop
    except ImportError:  # uvloop is optional (Windows); asyncio's loop works too
        return False
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    return True


def exit_with_parent(poll_seconds: float = 0.5) -> None:
    """Exit when the process that started this one dies.

    On Linux the kernel sends SIGTERM at the parent's death (prctl PDEATHSIG); a
    watcher thread also polls the parent pid, which covers other systems and the
    race where the parent died before prctl ran. Either way the process gets SIGTERM,
    so its own graceful-shutdown handler runs; if that hangs, the watcher exits hard.
    """
    parent = os.getppid()
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL("libc.so.6", use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
        except OSError:
            pass
    if parent <= 1:
        return  # started by init or as a container's first process: nobody to follow

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(poll_seconds)
        logging.getLogger(__name__).warning("parent %d died; exiting", parent)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(10.0)
        os._exit(1)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def process_age() -> float:
    """Seconds since this process started (interpreter start-up and imports included), so
    that each stage can log how long it took to be ready. Linux reads it from /proc; else
    the time since this module was imported."""
    try:
        with open("/proc/self/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        start_ticks = int(fields[19])  # field 22 of stat(5), after pid and comm
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return max(0.0, uptime - start_ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return time.monotonic() - _IMPORTED


_IMPORTED = time.monotonic()
