"""The model's side of the model server: `check` reads the Hub's metadata before anything is
downloaded and decides, by the rule the plan was made with (gpu_session_fit.py, shipped beside
this file: gpu_session/fit.py of the checkout), which files to download, whether the model fits
this host's GPUs and the context to serve; `download` fetches those files into the data root's
Hugging Face cache. Runs with the download tool's venv (huggingface_hub); HF_ENDPOINT and HF_TOKEN
come from the environment, never from arguments.

Failures print one line that says what to do and exit 2, so the role can show it as it is.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from huggingface_hub import HfApi, hf_hub_download, snapshot_download, try_to_load_from_cache
from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, RepositoryNotFoundError, RevisionNotFoundError

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gpu_session_fit as fit  # noqa: E402 (beside this file on the host)


def fail(message: str) -> None:
    print(message, file=sys.stderr)
    sys.exit(2)


def small_json(args, name: str, sha: str, token: str | None) -> dict:
    """A small JSON file of the repo ({} when it cannot be read)."""
    try:
        data = json.loads(Path(hf_hub_download(args.model, name, revision=sha, token=token, cache_dir=args.scratch)).read_text())
    except Exception:  # noqa: BLE001 (absent or unreadable: the rule goes on without it)
        return {}
    return data if isinstance(data, dict) else {}


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
    files = {s.rfilename: int(s.size or 0) for s in info.siblings or []}
    index = fit.index_file(files)
    weights = fit.weight_files(files, small_json(args, index, info.sha, token) if index else None)
    if not weights:
        fail(f"{args.model} has no weights an engine loads (.safetensors or .bin): choose a repo that has them.")
    config = small_json(args, "config.json", info.sha, token) if "config.json" in files else {}
    tokenizer = small_json(args, "tokenizer_config.json", info.sha, token) if "tokenizer_config.json" in files else {}
    weights_bytes = sum(weights.values())
    kv = fit.kv_bytes_per_token(config)
    in_memory = fit.weights_in_memory(weights_bytes, args.quantized, config)
    context = fit.default_context(config, tokenizer, args.context)
    need = fit.need(in_memory, kv, context)
    max_model_len = 0
    if args.gpu_memory_mib > 0:
        room = fit.room(args.gpu_memory_mib, args.gpus, share=args.gpu_memory_utilization)
        if need > room:
            fail(f"{args.model} needs {need / fit.GIB:.1f} GiB of GPU memory for {context:,} tokens of context (weights and KV cache); "
                 f"this host's {args.gpus} GPU(s) give {room / fit.GIB:.1f} GiB: choose a larger GPU type or more GPUs, quantize, "
                 "or ask for a shorter context.")  # fmt: skip
        # On vLLM's CPU build the KV cache has a space of its own: the context is what that space holds.
        max_model_len = fit.context_held(room, in_memory, kv, fit.model_context(config, tokenizer),
                                         fit.kv_space(args.device, args.cpu_kvcache_gb))  # fmt: skip
    download = fit.downloads(files, weights)
    # What an earlier converge downloaded of this commit is on the disk already: only the rest counts.
    missing = [f for f in download if not isinstance(try_to_load_from_cache(args.model, f, revision=info.sha), str)]
    needed = sum(files[f] for f in missing) + (fit.ENGINE_DISK_GIB * fit.GIB if args.engine_missing else 0)
    free = shutil.disk_usage(args.data_root).free
    if needed > free:
        fail(f"{args.model}: this host has {free / fit.GIB:.1f} GiB of disk free in {args.data_root} and needs {needed / fit.GIB:.1f} GiB "
             "(the weights and the engine): give the instance a larger disk (--disk).")  # fmt: skip
    return {"sha": info.sha, "gated": bool(info.gated), "files": download, "weights_bytes": weights_bytes,
            "kv_bytes_per_token": kv or 0, "need_bytes": need, "max_model_len": max_model_len}  # fmt: skip


def download(args) -> dict:
    start = time.monotonic()
    try:
        path = snapshot_download(
            args.model, revision=args.revision, allow_patterns=args.file or None, token=os.environ.get("HF_TOKEN") or None
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
    parser.add_argument("--file", action="append", default=[], help="download: the files to fetch (what check chose)")
    parser.add_argument("--gpu-memory-mib", type=float, default=0, help="check: all GPUs' memory.total (0: no fit check)")
    parser.add_argument("--gpus", type=int, default=1)
    parser.add_argument("--gpu-memory-utilization", type=float, default=fit.GPU_MEMORY_UTILIZATION)
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--cpu-kvcache-gb", type=float, default=fit.CPU_KVCACHE_GIB)
    parser.add_argument(
        "--context", type=int, default=0, help="tokens of context the host must hold at least (0: the model's default)"
    )
    parser.add_argument("--quantized", action="store_true")
    parser.add_argument("--data-root", default="/")
    parser.add_argument("--engine-missing", action="store_true", help="the engine is still to be installed (its disk counts)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:  # the small files read by check
        args.scratch = scratch
        print(json.dumps((check if args.action == "check" else download)(args)))


if __name__ == "__main__":
    main()
