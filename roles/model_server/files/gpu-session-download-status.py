"""One try of the role's wait for the download ("Wait for the download"): prints one line of JSON,
{"bytes": …, "total": …, "finished": …}, where bytes is what the model's folder in the Hub cache
holds so far (its blobs, partial ones included) and total the size of its weights (from the Hub's
metadata, given by the role).

Exits 0 while the download runs. Once it has ended, the line also carries what the download printed
(its path and seconds), the download's stderr goes to stderr and the exit status is the download's,
so the until-loop ends and a failure says why. Reads Ansible's status file of the async job (written
whole, then renamed: never half-read). Standard library only; HF_HUB_CACHE or HF_HOME from the
session's environment (it runs through gpu-session-env, as the download does).
"""

from __future__ import annotations

import argparse
import json
import os
import stat
import sys


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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--job", required=True, help="the async job's status file")
    parser.add_argument("--model", required=True, help="the Hub id, owner/name")
    parser.add_argument("--total", type=int, default=0, help="the weights' size in bytes")
    args = parser.parse_args()
    folder = os.path.join(hub_cache(), "models--" + args.model.replace("/", "--"), "blobs")
    try:
        with open(args.job) as f:
            job = json.load(f)
    except FileNotFoundError:
        job = {"started": True}  # not written yet: the job is starting
    said = {"bytes": folder_bytes(folder), "total": args.total, "finished": "started" not in job}
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
    elif job.get("failed") and job.get("msg"):
        sys.stderr.write(f"{job['msg']}\n")
    rc = job.get("rc")
    return rc if isinstance(rc, int) and 0 <= rc < 256 else (1 if job.get("failed") else 0)


if __name__ == "__main__":
    sys.exit(main())
