"""The model's side of the model server: `check` reads the Hub's metadata before anything is
downloaded (size of what will be fetched, gated or not, the commit a revision points at), and
`download` fetches it into the data root's Hugging Face cache. Runs with the download tool's venv
(huggingface_hub); HF_ENDPOINT and HF_TOKEN come from the environment, never from arguments.

Failures print one line that says what to do and exit 2, so the role can show it as it is.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import os
import sys
import time

from huggingface_hub import HfApi, snapshot_download
from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, RepositoryNotFoundError, RevisionNotFoundError


def fail(message: str) -> None:
    print(message, file=sys.stderr)
    sys.exit(2)


def wanted(name: str, exclude: list[str]) -> bool:
    return not any(fnmatch.fnmatch(name, pattern) for pattern in exclude)


def check(args) -> dict:
    token = os.environ.get("HF_TOKEN") or None
    try:
        info = HfApi().model_info(args.model, revision=args.revision, files_metadata=True, token=token)
    except RevisionNotFoundError:
        fail(f"{args.model} has no revision {args.revision!r}: give a branch, tag or commit that exists.")
    except RepositoryNotFoundError:
        fail(f"{args.model} is not on the Hub, or is private and the HF token cannot see it: check the id, or give a token.")
    except HfHubHTTPError as e:
        fail(f"The Hub refused to describe {args.model}: {e}")
    if info.gated and not token:
        fail(f"{args.model} is gated: accept its license on its Hub page, then give an HF token (HF_TOKEN, or hfToken).")
    files = [s for s in info.siblings or [] if wanted(s.rfilename, args.exclude)]
    weights = sum(s.size or 0 for s in files if s.rfilename.endswith((".safetensors", ".bin")))
    return {"sha": info.sha, "gated": bool(info.gated), "files": len(files), "weights_bytes": weights}


def download(args) -> dict:
    start = time.monotonic()
    try:
        path = snapshot_download(
            args.model, revision=args.revision, ignore_patterns=args.exclude, token=os.environ.get("HF_TOKEN") or None
        )
    except GatedRepoError:
        fail(
            f"{args.model} is gated and this HF token has no access: accept its license on its Hub page with the token's account."
        )
    except HfHubHTTPError as e:
        fail(f"Downloading {args.model} failed: {e}")
    return {"path": path, "seconds": round(time.monotonic() - start, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("action", choices=["check", "download"])
    parser.add_argument("--model", required=True)
    parser.add_argument("--revision", default="main")
    parser.add_argument("--exclude", action="append", default=[])
    args = parser.parse_args()
    print(json.dumps((check if args.action == "check" else download)(args)))


if __name__ == "__main__":
    main()
