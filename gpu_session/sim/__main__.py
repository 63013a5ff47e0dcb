"""`python -m gpu_session.sim` (and `invoke sim`): run the simulator in the foreground, list its
state, inject faults into a running one, or clean up after one that died."""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import signal
import socket
import sys
import time
from pathlib import Path

import requests

from gpu_session.errors import in_our_words, our_command
from gpu_session.paths import write_private

from . import SimConfig, Simulator, default_state_dir, hub_models
from .world import FAULT_KINDS, TRASH_DIR, remove_trash

# The port this state dir's simulator last listened on. Sessions and cache stacks record the
# simulator's addresses (their environment.json), so a restarted simulator (after --stop, a reboot)
# listens there again while that port is free; otherwise their down and cost find no cloud.
PORT_FILE = "port"


def _last_port(state_dir: Path) -> int:
    """The port in PORT_FILE while nothing else listens on it; else 0 (a free one)."""
    try:
        port = int((state_dir / PORT_FILE).read_text())
    except (OSError, ValueError):
        return 0
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server binds it (TIME_WAIT is free)
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return 0
    return port


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="gpu-session sim", description=__doc__)
    p.add_argument("--state-dir", type=Path, default=None, help="where hosts, models and sim.json live")
    p.add_argument(
        "--port", type=int, default=0, help="API port (default: the last one of --state-dir while free, else a free one)"
    )
    p.add_argument("--boot-delay", type=float, default=3.0, help="seconds from launch until a host starts")
    p.add_argument("--no-rate-limits", action="store_true", help="turn off Lambda's 1 request/s and 1 launch/12 s")
    p.add_argument("--loopback", action="store_true", help="sshd on loopback ports instead of isolated hosts")
    p.add_argument(
        "--capacity",
        action="append",
        default=[],
        metavar="CLOUD:TYPE[:REGION]=N",
        help="instances a type can hold per region, e.g. lambda:gpu_1x_a10=0 or 'runpod:NVIDIA L40S:EU-RO-1=2'",
    )
    p.add_argument(
        "--fault",
        action="append",
        default=[],
        metavar="API:OP:KIND[:TIMES]",
        help=f"inject a fault, e.g. lambda:instance-operations/launch:503:2 (kinds: {', '.join(FAULT_KINDS)})",
    )
    p.add_argument(
        "--hub-extra",
        action="append",
        default=[],
        type=Path,
        metavar="FILE",
        help="more Hub entries from a YAML file (the format: gpu_session/sim/hub_models.py, the README); "
        "an id already served is replaced; into a running simulator too",
    )
    p.add_argument("--env", action="store_true", help="print the running simulator's export lines and exit (for eval)")
    p.add_argument("--list", action="store_true", help="print the state of the running simulator and exit")
    p.add_argument("--json", action="store_true", help="with --list: JSON")
    p.add_argument("--cleanup", action="store_true", help="remove networks and hosts left by a simulator that died")
    p.add_argument("--stop", action="store_true", help="stop the running simulator (one started in the background too)")
    p.add_argument("-v", "--verbose", action="store_true")
    return p.parse_args(argv)


def _info(state_dir: Path) -> dict:
    path = state_dir / "sim.json"
    if not path.exists():
        sys.exit(f"no simulator is running for {state_dir} (start one with {our_command('sim')})")
    return json.loads(path.read_text())


class NotAnswering(SystemExit):
    """sim.json names a simulator that does not answer (it died)."""


def _admin(state_dir: Path, method: str, path: str, body: dict | None = None) -> dict:
    info = _info(state_dir)
    try:
        resp = requests.request(method, info["url"] + path, json=body, headers={"X-Sim-Admin": info["admin_token"]}, timeout=10)
    except requests.ConnectionError:
        raise NotAnswering(
            f"the simulator at {info['url']} does not answer; if it died, run {our_command('sim --cleanup')}"
        ) from None
    if not resp.ok:
        sys.exit(f"simulator: {resp.status_code} {resp.text}")
    return resp.json()


STOP_TIMEOUT_S = 60


def stop_running(state_dir: Path) -> int:
    """Stop the simulator that sim.json names, as Ctrl-C in its terminal would: it removes its hosts
    (its volumes stay). It refuses while it runs an instance a session may still count on: SystemExit
    with its words then, or when it does not stop within STOP_TIMEOUT_S. One that died: its sim.json
    goes, and `--cleanup` is named for what it left."""
    info_file = state_dir / "sim.json"
    if not info_file.exists():
        print(f"no simulator is running for {state_dir}: nothing to stop", file=sys.stderr)
        return 0
    info = json.loads(info_file.read_text())
    try:
        resp = requests.post(info["url"] + "/_sim/stop", headers={"X-Sim-Admin": info["admin_token"]}, timeout=10)
    except requests.ConnectionError:
        info_file.unlink(missing_ok=True)
        print(f"the simulator at {info['url']} had died: its sim.json is removed; {our_command('sim --cleanup')} removes the "
              "networks and hosts it left", file=sys.stderr)  # fmt: skip
        return 0
    if not resp.ok:
        # The simulator names the installed script (it cannot know how its client was run): in_our_words.
        sys.exit(in_our_words(resp.json().get("error") or f"simulator: {resp.status_code} {resp.text}"))
    deadline = time.monotonic() + STOP_TIMEOUT_S
    while info_file.exists():  # it removes sim.json last, once its hosts are gone
        if time.monotonic() > deadline:
            sys.exit(f"the simulator at {info['url']} did not stop within {STOP_TIMEOUT_S} s; its log says why")
        time.sleep(0.2)
    print(f"stopped the simulator at {info['url']}; its volumes stay in {state_dir / 'volumes'}", file=sys.stderr)
    return 0


def parse_fault(spec: str) -> dict:
    parts = spec.split(":")
    if len(parts) not in (3, 4) or parts[2] not in FAULT_KINDS:
        raise SystemExit(f"bad --fault {spec!r}: API:OP:KIND[:TIMES] with KIND one of {', '.join(FAULT_KINDS)}")
    return {"target": f"{parts[0]}:{parts[1]}", "kind": parts[2], "times": int(parts[3]) if len(parts) == 4 else 1}


def read_hub_extra(path: Path) -> tuple[str, list[hub_models.HubModel]]:
    """A --hub-extra file's text and entries, or the one-line error that names the entry and field."""
    try:
        text = path.read_text()
        return text, hub_models.parse(text, str(path))
    except OSError as e:
        raise SystemExit(f"bad --hub-extra: cannot read {path}: {e.strerror}") from None
    except hub_models.BadHubEntry as e:
        raise SystemExit(f"bad --hub-extra: {e}") from None


def parse_capacity(spec: str) -> dict:
    where, _, slots = spec.rpartition("=")
    parts = where.split(":")
    if len(parts) not in (2, 3) or not slots.isdigit() or parts[0] not in ("lambda", "runpod"):
        raise SystemExit(f"bad --capacity {spec!r}: CLOUD:TYPE[:REGION]=N, CLOUD lambda or runpod")
    return {"cloud": parts[0], "type": parts[1], "region": parts[2] if len(parts) == 3 else None, "slots": int(slots)}


def print_exports(env: dict) -> None:
    for k, v in env.items():
        print(f"export {k}={shlex.quote(v)}")
    sys.stdout.flush()


def print_state(state: dict, as_json: bool) -> None:
    if as_json:
        print(json.dumps(state, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title="simulated instances")
    for col in ("cloud", "id", "name", "type", "region", "status", "ssh"):
        table.add_column(col)
    for i in state["instances"]:
        ssh = f"{i['address']}:{i['ssh_port']}" if i["address"] else "-"
        table.add_row(i["cloud"], i["id"], i["name"], i["type"], i["region"], i["status"], ssh)
    console = Console()
    console.print(table)
    console.print(f"SSH keys (Lambda): {', '.join(k['name'] for k in state['ssh_keys']) or 'none'}")
    for v in state.get("volumes", []):
        used = f"used by {', '.join(v['used_by'])}" if v["used_by"] else "unused"
        console.print(f"volume: {v['cloud']} {v['name']} ({v['id']}) in {v['region']}, {used}: {v['dir']}")
    for t in state.get("terminations", []):
        console.print(f"terminated: {t['cloud']} {t['name']} ({t['id']}) with the {t['by']}")
    if state["faults"]:
        console.print(f"pending faults: {state['faults']}")
    if not state["hosts_isolated"]:
        console.print("[yellow]hosts are loopback sshd processes (not isolated)[/yellow]")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    state_dir = args.state_dir or default_state_dir()
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="sim: %(message)s", stream=sys.stderr)
    if args.env:
        _admin(state_dir, "GET", "/_sim/state")  # it must be answering, not just have left sim.json behind
        print_exports(_info(state_dir)["env"])
        return 0
    if args.list:
        print_state(_admin(state_dir, "GET", "/_sim/state"), args.json)
        return 0
    if args.stop:
        return stop_running(state_dir)
    if args.cleanup:
        from .hosts import reclaim_networks

        networks, hosts = reclaim_networks()
        removed = remove_trash(state_dir)  # deleted volumes' folders it was still removing (its volumes stay)
        said = [f"{networks} network(s) and {hosts} host(s) of simulators that are no longer running"] if networks else []
        said += [f"{removed} deleted volume(s)' leftovers in {state_dir / TRASH_DIR}"] if removed else []
        print(f"removed {' and '.join(said)}" if said else "nothing to clean up: no simulator left networks, hosts or "
              "deleted volumes behind", file=sys.stderr)  # fmt: skip
        return 0
    faults = [parse_fault(f) for f in args.fault]
    capacity = [parse_capacity(c) for c in args.capacity]
    extra = [(path, *read_hub_extra(path)) for path in args.hub_extra]  # every file checked before any is used
    if (faults or capacity or extra) and (state_dir / "sim.json").exists():
        try:  # a simulator is running: change it instead of starting another
            for f in faults:
                _admin(state_dir, "POST", "/_sim/faults", f)
            for c in capacity:
                _admin(state_dir, "POST", "/_sim/capacity", c)
            for path, text, entries in extra:
                _admin(state_dir, "POST", "/_sim/hub", {"source": str(path), "yaml": text})
                print(f"the simulator's Hub now serves {', '.join(m.repo_id for m in entries)}", file=sys.stderr)
            return 0
        except NotAnswering:
            pass
    config = SimConfig(boot_delay=args.boot_delay, isolate_hosts=False if args.loopback else None)
    if args.no_rate_limits:
        config.lambda_rate = config.lambda_launch_rate = 0
    sim = Simulator(state_dir, config, port=args.port or _last_port(state_dir))
    # Before the export lines: whoever read them may stop it at once (a script, a test), and a
    # SIGTERM before this handler would kill it without removing its hosts and network.
    signal.signal(signal.SIGTERM, lambda *_: sim.stop_requested.set())
    write_private(state_dir / PORT_FILE, str(sim.server.port))
    for f in faults:
        sim.inject(**f)
    for c in capacity:
        sim.set_capacity(c["cloud"], c["type"], c["slots"], c["region"])
    for _, _, entries in extra:
        sim.add_hub_models(entries)
    print_exports(sim.env())
    print(
        f"# simulator on {sim.url} ({'isolated hosts' if sim.world.hosts.isolated else 'loopback hosts'}); "
        f"Ctrl-C (or {our_command('sim --stop')}) stops it and removes its hosts",
        file=sys.stderr,
    )
    sim.stoppable = True  # `invoke sim --stop` from another terminal, or from anywhere for a background one
    try:
        sim.stop_requested.wait()
    except KeyboardInterrupt:
        pass
    finally:
        sim.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
