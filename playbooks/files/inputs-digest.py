"""Prints one digest of what a converge depends on: the roles' and playbooks' files (molecule
scenarios aside) and the variables, whose own digest is the argument. Runs on the controller."""

import hashlib
import sys
from pathlib import Path

root = Path(__file__).resolve().parents[2]
digest = hashlib.sha256(sys.argv[1].encode())
for path in sorted(p for d in ("roles", "playbooks", "inventory/group_vars") for p in (root / d).rglob("*") if p.is_file()):
    if "molecule" not in path.parts and "__pycache__" not in path.parts:
        digest.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes())
print(digest.hexdigest())
