"""The model's download as a job of our own, and one look at it for the role's wait.

    start --job FILE -- ARGV…
        Runs ARGV detached (a new session, its own process group, stdin/stdout/stderr not the
        caller's, so the Ansible task that starts it returns at once and the end of its SSH session
        ends nothing), and returns. FILE says {"started": 1, "pid": P, "since": T, "token": …} while
        ARGV runs and, once it has ended, {"rc": …, "stdout": …, "stderr": …, "token": …}; written
        whole, then renamed (never half read), root's and 0600. A job an earlier (interrupted)
        converge left running is ended first, and a job writes its result only over its own start.
    status --job FILE --model M --total BYTES
        Prints one line of JSON, {"bytes": …, "total": …, "finished": …}, where bytes is what the
        model's folder in the Hub cache holds so far (its blobs, partial ones included) and total the
        size of its weights (from the Hub's metadata, given by the role). Exits 0 while the job runs.
        Once it has ended, the line also carries what the download printed (its path and seconds),
        the download's stderr goes to stderr and the exit status is the download's, so the role's
        until-loop ends and a failure says why; a job whose process is gone without a result (killed)
        is a failure that says so.

Our own job rather than Ansible's async: Ansible keeps an async job's status where its async
settings say and Mitogen's strategy does not return its results_file; the role's wait needs one file
it names. Standard library only; HF_HUB_CACHE or HF_HOME from the session's environment (status runs
through gpu-session-env, as the download does).
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import signal
import stat
import subprocess
import sys
import tempfile
import time

# What a job whose process is gone without a result says (killed, or the host restarted).
GONE = "The download stopped without a result (its process is gone): run up again to download the rest."


def write_job(path: str, job: dict) -> None:
    """Write the job's file whole (0600, under a name of its own), then rename it into place: a
    reader never sees half of it."""
    fd, part = tempfile.mkstemp(dir=os.path.dirname(path) or ".", prefix=".download-", suffix=".part")
    with os.fdopen(fd, "w") as f:
        json.dump(job, f)
    os.replace(part, path)


def read_job(path: str) -> dict | None:
    """The job's file, or None when there is none; one that does not parse is a failed job."""
    try:
        with open(path) as f:
            job = json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        return {"rc": 1, "stderr": f"The download's job file {path} cannot be read ({e}): run up again.\n"}
    return job if isinstance(job, dict) else {"rc": 1, "stderr": f"The download's job file {path} is not a job.\n"}


def since(pid: int) -> int | None:
    """When process `pid` started (clock ticks after boot, /proc/PID/stat's 22nd field), or None when
    it is gone or a zombie (which nobody may reap in a container): with the pid, it names one process
    even after the pid is reused."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rpartition(")")[2].split()
    except OSError:
        return None
    return None if not fields or fields[0] == "Z" else int(fields[19])


def running(job: dict | None) -> bool:
    """Whether the job a file describes still runs."""
    return bool(job) and "started" in job and isinstance(job.get("pid"), int) and since(job["pid"]) == job.get("since")


def end(job: dict) -> None:
    """End a running job and all it started (its process group), SIGTERM first, then SIGKILL."""
    try:
        group = os.getpgid(job["pid"])
    except ProcessLookupError:
        return
    for sig, wait_s in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(group, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + wait_s
        while running(job) and time.monotonic() < deadline:
            time.sleep(0.1)
        if not running(job):
            return


def start(path: str, argv: list[str]) -> int:
    """Start `argv` as a detached job reporting to `path` (see the module's doc). A job an earlier,
    interrupted converge left running is ended first: one download at a time, one result per file.
    Returns once the file names the job's process (0), or 1 when it could not be started."""
    earlier = read_job(path)
    if running(earlier):
        end(earlier)
    token = secrets.token_hex(8)  # the job writes its result only over its own start
    go_read, go_write = os.pipe()  # the job waits until its start is on file
    first = os.fork()
    if first:
        os.close(go_read)
        os.close(go_write)
        return 1 if os.waitstatus_to_exitcode(os.waitpid(first, 0)[1]) else 0
    code = 1
    try:
        # The first child: a session of its own (a process group scrub and `end` can end whole),
        # then the job's process, whose parent ends at once (it belongs to init: nothing of the
        # caller's waits for it or signals it).
        os.setsid()
        job = os.fork()
        if job:
            os.close(go_read)
            write_job(path, {"started": 1, "pid": job, "since": since(job), "token": token})
            os.close(go_write)
            code = 0
        else:
            os.close(go_write)
            run_job(path, argv, token, go_read)
            code = 0
    except BaseException as e:  # noqa: BLE001 (said in the job's file, never raised past the fork)
        try:
            write_job(path, {"rc": 1, "stdout": "", "stderr": f"The download could not be started: {e}\n", "token": token})
        except OSError:
            pass
    finally:
        os._exit(code)


def run_job(path: str, argv: list[str], token: str, go: int) -> None:
    """The job's process: wait for its start to be on file, run `argv`, write its result."""
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    os.read(go, 1)  # the first child closes its end once the file names this process
    os.close(go)
    try:
        done = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True, errors="replace")
        result = {"rc": done.returncode, "stdout": done.stdout, "stderr": done.stderr, "token": token}
        if done.returncode < 0:  # a signal's: the exit status says nothing of it
            result["stderr"] += f"The download was stopped by signal {-done.returncode}.\n"
    except OSError as e:
        result = {"rc": 127, "stdout": "", "stderr": f"{argv[0]}: {e}\n", "token": token}
    if (read_job(path) or {}).get("token") == token:  # a later start has not replaced this job
        write_job(path, result)


def folder_bytes(folder: str) -> int:
    """Bytes of the regular files under `folder` (symlinks not followed; a file gone meanwhile skipped)."""
    total = 0
    for root, _, files in os.walk(folder):
        for name in files:
            try:
                st = os.lstat(os.path.join(root, name))
            except OSError:
                continue
            if stat.S_ISREG(st.st_mode):
                total += st.st_size
    return total


def hub_cache() -> str:
    home = os.environ.get("HF_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "huggingface")
    return os.environ.get("HF_HUB_CACHE") or os.path.join(home, "hub")


def status(path: str, model: str, total: int) -> int:
    """Print how far the job is (see the module's doc); its exit status once it has ended, else 0."""
    folder = os.path.join(hub_cache(), "models--" + model.replace("/", "--"), "blobs")
    job = read_job(path)
    if job is None:
        job = {"rc": 1, "stderr": "The download was never started (no job file).\n"}
    elif "started" in job and not running(job):
        job = read_job(path) or {}  # it may have written its result since the first read
        if "started" in job:
            job = {"rc": 1, "stderr": GONE + "\n"}
    said = {"bytes": folder_bytes(folder), "total": total, "finished": "started" not in job}
    if not said["finished"]:
        print(json.dumps(said), flush=True)
        return 0
    try:
        result = json.loads(job.get("stdout") or "{}")
    except ValueError:
        result = {}
    print(json.dumps({**(result if isinstance(result, dict) else {}), **said}), flush=True)
    if job.get("stderr"):
        sys.stderr.write(job["stderr"])
    rc = job.get("rc")
    return rc if isinstance(rc, int) and 0 <= rc < 256 else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    started = commands.add_parser("start", help="start ARGV as a detached job")
    started.add_argument("--job", required=True, help="the job's file")
    started.add_argument("argv", nargs=argparse.REMAINDER, help="-- then the command and its arguments")
    looked = commands.add_parser("status", help="how far the job is")
    looked.add_argument("--job", required=True, help="the job's file")
    looked.add_argument("--model", required=True, help="the Hub id, owner/name")
    looked.add_argument("--total", type=int, default=0, help="the weights' size in bytes")
    args = parser.parse_args()
    if args.command == "start":
        argv = args.argv[1:] if args.argv[:1] == ["--"] else args.argv
        if not argv:
            parser.error("start needs -- and the command to run")
        return start(args.job, argv)
    return status(args.job, args.model, args.total)


if __name__ == "__main__":
    sys.exit(main())
