"""The canary search of a cache volume (scrub's verify.yml): every regular file under the root given
(symlinks not followed) is read and searched for each canary (one a line on stdin), but for sealed
weight blobs: a file under a Hub cache's blobs/ named by its hash (64 or 40 hex), owned by root and
writable by nobody, which model_server sealed after checking its bytes against the Hub's hash. No
process of the session (the service user) could have written into one; everything else is read,
binary or not, each inode once (hard links share it). Prints one line of JSON: the files a canary was found in (at most five per canary),
and what the search cost (files and bytes read, sealed blobs skipped and their bytes, seconds).
Standard library only."""

from __future__ import annotations

import json
import os
import re
import stat
import sys
import time

HASH_NAME = re.compile(r"[0-9a-f]{40}([0-9a-f]{24})?")
CHUNK = 1 << 22


def sealed(path: str, st: os.stat_result) -> bool:
    parent = os.path.basename(os.path.dirname(path))
    return (
        parent == "blobs"
        and HASH_NAME.fullmatch(os.path.basename(path)) is not None
        and st.st_uid == 0
        and st.st_mode & 0o222 == 0
    )


def holds(path: str, canaries: list[bytes]) -> set[bytes]:
    """Which canaries the file holds (read in chunks that overlap by the longest canary)."""
    keep = max(len(c) for c in canaries) - 1
    found: set[bytes] = set()
    tail = b""
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            data = tail + chunk
            found |= {c for c in canaries if c not in found and c in data}
            tail = data[-keep:] if keep else b""
    return found


def main() -> int:
    root = sys.argv[1]
    canaries = [line.strip().encode() for line in sys.stdin if line.strip()]
    start = time.monotonic()
    cost = {"files_read": 0, "bytes_read": 0, "sealed_blobs_skipped": 0, "sealed_bytes_skipped": 0}
    where: dict[bytes, list[str]] = {c: [] for c in canaries}
    seen: dict[tuple[int, int], set[bytes]] = {}  # a file hard-linked elsewhere (uv's cache and the venvs) is read once
    for base, _, files in os.walk(root):
        for name in files:
            path = os.path.join(base, name)
            try:
                st = os.lstat(path)
            except OSError:
                continue
            if not stat.S_ISREG(st.st_mode):
                continue
            if sealed(path, st):
                cost["sealed_blobs_skipped"] += 1
                cost["sealed_bytes_skipped"] += st.st_size
                continue
            if not canaries:
                continue
            inode = (st.st_dev, st.st_ino)
            if inode in seen:
                found = seen[inode]
            else:
                cost["files_read"] += 1
                cost["bytes_read"] += st.st_size
                try:
                    found = seen[inode] = holds(path, canaries)
                except OSError:
                    continue
            for c in found:
                if len(where[c]) < 5:
                    where[c].append(path)
    found_in = sorted({p for paths in where.values() for p in paths})
    print(json.dumps({"found": found_in, **cost, "seconds": round(time.monotonic() - start, 1)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
