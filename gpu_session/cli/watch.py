"""The watch's process (`python -m gpu_session.cli.watch --stack S`, started by `up`): the lease
and budget guard of gpu_session.session.watch, ending the session with `down` as a person would."""

from __future__ import annotations

import argparse
import time

from gpu_session.session import down, watch
from gpu_session.stack.automation import StackEvent


def say(text: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} {text}", flush=True)


def on_event(event: StackEvent) -> None:
    if event.kind in ("done", "failed") or event.message:
        say(f"{event.kind} {event.op} {event.type} {event.name} {event.message}".strip())


def main() -> None:
    parser = argparse.ArgumentParser(description="Guard a session's budget and lease (started by `invoke up`)")
    parser.add_argument("--stack", required=True)
    stack = parser.parse_args().stack
    watch.guard(stack, lambda s: down.down(s, say=say, on_event=on_event), say)


if __name__ == "__main__":
    main()
