"""A provider process ends with the engine that started it.

The engine (the `pulumi` CLI) starts `python -m pulumi.dynamic <engine address>` for our providers
and ends it when the operation is over. When the engine itself is killed (kill -9 of `pulumi up` or
`invoke up`, a crash, a second Ctrl-C), nothing ends the provider: it would wait for calls
forever, and a Configure in flight would go on configuring a host for an engine that is gone. So
the first call into a provider starts a watch on the engine's address, as Pulumi's Go providers do
(rpcutil.Healthcheck); when the engine stops answering the process exits, and the converge it runs
sees its parent go and cancels its playbook (gpu_session.host.ansible).
"""

from __future__ import annotations

import os
import socket
import sys
import threading
import time

INTERVAL_S = 1.0
_lock = threading.Lock()
_watching = False


def engine_address(argv: list[str]) -> tuple[str, int] | None:
    """The engine's address when this process is `python -m pulumi.dynamic HOST:PORT`, else None."""
    if len(argv) < 2 or not argv[0].replace(os.sep, "/").endswith("pulumi/dynamic/__main__.py"):
        return None
    host, _, port = argv[1].rpartition(":")
    return (host, int(port)) if host and port.isdigit() else None


def answers(address: tuple[str, int]) -> bool:
    try:
        socket.create_connection(address, timeout=5).close()
        return True
    except OSError:
        return False


def end_with_engine() -> None:
    """In a provider process: exit (status 1) once the engine stops answering. Idempotent, and a
    no-op in any other process (a test calling a provider directly). Call it from configure()."""
    global _watching
    address = engine_address(sys.argv)
    with _lock:
        if _watching or address is None:
            return
        _watching = True

    def watch() -> None:
        while answers(address):
            time.sleep(INTERVAL_S)
        os._exit(1)  # no cleanup to run: the state is the engine's, and it is gone

    threading.Thread(target=watch, name="end-with-engine", daemon=True).start()
