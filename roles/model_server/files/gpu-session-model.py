"""The model's side of the model server: `check` reads the Hub's metadata before anything is
downloaded and decides, by the rule the plan was made with (gpu_session_fit.py, shipped beside
this file: gpu_session/fit.py of the checkout), which files to download, whether the model fits
this host's GPUs and the context to serve; `download` fetches those files into the Hugging Face
cache (HF_HUB_CACHE: the data root's, or the session's cache volume's). Runs with the download
tool's venv (huggingface_hub); HF_ENDPOINT and HF_TOKEN come from the environment, never from
arguments.

With a cache volume (`check --verify`), every file of the revision already in the Hub cache is
checked against the hash the Hub gives for it before it is reused: an LFS file's sha256, a small git
file's git blob sha1 (the name of its blob in the cache, its etag, is that same hash), once: a
record of the sealed blob's inode (verified/ beside the Hub cache) spares the hash while the file is
as it was (records_dir). A file that
does not verify is removed (its snapshot link and its blob) so the download fetches it again. The
space check then measures the volume: what statvfs says is free, capped by the volume's size less
what is stored under it when the cloud caps it (--cache-size-gb). Each verified blob is sealed
(root's, read-only), and `seal` verifies and seals what a download just wrote: scrub's canary
search skips sealed blobs, which no process of the session could have written into.

Failures print one line that says what to do and exit 2, so the role can show it as it is.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import stat
import sys
import tempfile
import time
from pathlib import Path

from huggingface_hub import HfApi, hf_hub_download, snapshot_download, try_to_load_from_cache
from huggingface_hub import constants as hf_constants
from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, RepositoryNotFoundError, RevisionNotFoundError

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gpu_session_fit as fit  # noqa: E402 (beside this file on the host)

CHUNK = 1 << 20


def fail(message: str) -> None:
    print(message, file=sys.stderr)
    sys.exit(2)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def git_blob_sha1(path: Path) -> str:
    """The git blob id of a file: sha1 of "blob <size>\\0" and its bytes (the etag of a small git file)."""
    h = hashlib.sha1(f"blob {path.stat().st_size}\0".encode())  # noqa: S324 (git's id, not security)
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def file_hash(path: Path, expected: str) -> str:
    """The file's hash of the kind expected: sha256 (64 hex, LFS) or git blob sha1 (40 hex)."""
    return sha256_file(path) if len(expected) == 64 else git_blob_sha1(path)


def hub_hashes(siblings) -> dict[str, str]:
    """What the Hub says each file hashes to (model_info with files_metadata): the LFS sha256, else the git blob id."""
    out = {}
    for s in siblings or []:
        lfs = getattr(s, "lfs", None)
        sha = (lfs.get("sha256") if isinstance(lfs, dict) else getattr(lfs, "sha256", None)) if lfs else None
        if sha or s.blob_id:
            out[s.rfilename] = sha or s.blob_id
    return out


def repo_folder(hub_cache: Path, model: str) -> Path:
    return Path(hub_cache) / ("models--" + model.replace("/", "--"))


def seal(blob: Path) -> None:
    """A verified blob becomes root's and read-only: no process of the session (the service user) can
    write into it afterwards, so scrub's canary search may skip it (roles/scrub). Not root: unchanged.
    One sealed already is left as it is (a chmod would change its ctime, which its record holds).
    The session's user writes the Hub cache, so what is sealed is the file opened, never a link in
    its place, and only a regular file with one name (a hard link the user made to a file of the
    host's would otherwise hand that file to root's chown and chmod)."""
    try:
        fd = os.open(blob, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or (st.st_uid == 0 and stat.S_IMODE(st.st_mode) == 0o444):
            return
        if os.geteuid() == 0:
            if st.st_nlink != 1:
                return
            os.fchown(fd, 0, 0)
        os.fchmod(fd, 0o444)
    except OSError:
        pass
    finally:
        os.close(fd)


# Hash once, trust after: a blob hashed and sealed has a record beside the Hub cache (root's, 0700,
# as root only; verified/<repo folder>/<blob>) of what it was then. Any write to the file, a chmod
# or chown, or another file in its place changes its ctime (which no process can set), inode, or
# owner and mode, and it is hashed again: a 141 GB model is not read in full on every warm start.
def records_dir(folder: Path) -> Path | None:
    """Where the records of the blobs of the Hub cache repo folder `folder` are: `verified/` beside
    the Hub cache; None when not root, or when something other than a folder of root's is there (a
    record the session's user could write proves nothing)."""
    if os.geteuid() != 0:
        return None
    path = folder.parent.parent / "verified"
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return path  # hash_and_remember makes it, root's 0700
    return path if stat.S_ISDIR(st.st_mode) and st.st_uid == 0 else None


def drop_symlinked_folders(folder: Path) -> list[str]:
    """A Hub cache repo folder holds no link to a folder (only its snapshots' files are links, to its
    blobs). One planted there (the session's processes write the Hub cache) would lead root's checks
    and removals elsewhere on the host: it is unlinked, never followed. The paths unlinked."""
    if folder.is_symlink():
        folder.unlink()
        return [str(folder)]
    dropped = []
    for base, dirs, _ in os.walk(folder):
        for name in list(dirs):
            path = os.path.join(base, name)
            if os.path.islink(path):
                os.unlink(path)
                dirs.remove(name)
                dropped.append(path)
    return dropped


def stamp(blob: Path) -> str:
    """What of a sealed blob's inode a record keeps (not its device: each host numbers its mounts)."""
    st = os.stat(blob)
    return f"{st.st_ino} {st.st_size} {st.st_mtime_ns} {st.st_ctime_ns} {st.st_uid} {stat.S_IMODE(st.st_mode):o}"


def sealed(seen: str) -> bool:
    """Whether a stamp is of a file root owns and nobody may write (uid 0, no write bit)."""
    _, _, _, _, uid, mode = seen.split()
    return uid == "0" and not int(mode, 8) & 0o222


def hashed_before(records: Path | None, folder: Path, blob: Path) -> bool:
    """Whether `blob` is sealed and as it was when it was hashed (its record says so)."""
    try:
        seen = stamp(blob)
        return records is not None and sealed(seen) and (records / folder.name / blob.name).read_text() == seen
    except OSError:
        return False


def hash_and_remember(records: Path | None, folder: Path, blob: Path, want: str) -> bool:
    """Seal `blob`, then hash it: whether it hashes to `want`. Its record is written only when the
    blob is sealed and did not change while it was read (a writer that opened it before the seal
    moves its ctime), so a record never vouches for bytes that were not the ones hashed."""
    seal(blob)
    before = stamp(blob)
    if file_hash(blob, want) != want:
        return False
    if records is not None and sealed(before) and stamp(blob) == before:
        records.mkdir(mode=0o700, exist_ok=True)
        (records / folder.name).mkdir(mode=0o700, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=records / folder.name, prefix=".record.")
        with os.fdopen(fd, "w") as f:
            f.write(before)
        os.replace(tmp, records / folder.name / blob.name)  # whole, or not at all
    return True


# Root writes and removes in a Hub cache the session's user writes too (the cache volume's): each
# folder on the way is opened without following a link, so that a folder it swapped for a link
# between a check and the write cannot lead root's write or removal elsewhere on the host.
NO_FOLLOW_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW


def open_folder(base: Path, parts: list[str], make: bool = False) -> int:
    """A descriptor of the folder base/parts… (base trusted: its parent is root's), each part opened
    without following a link; with `make`, missing parts are made (0755). OSError for a part that is
    a link, not a folder, or absent (without `make`)."""
    fd = os.open(base, NO_FOLLOW_DIR)
    try:
        for part in parts:
            if make:
                try:
                    os.mkdir(part, 0o755, dir_fd=fd)
                except FileExistsError:
                    pass
            inner = os.open(part, NO_FOLLOW_DIR, dir_fd=fd)
            os.close(fd)
            fd = inner
    except BaseException:
        os.close(fd)
        raise
    return fd


def remove_in(base: Path, relative: str) -> None:
    """Unlinks base/relative (a file or a link, never what a link points to) through folders opened
    without following links; nothing when it, or a folder on the way, is not there as a folder."""
    *parts, name = Path(relative).parts
    try:
        fd = open_folder(base, parts)
    except OSError:
        return
    try:
        os.unlink(name, dir_fd=fd)
    except (FileNotFoundError, IsADirectoryError, PermissionError):
        pass
    finally:
        os.close(fd)


def write_ref(folder: Path, revision: str, sha: str) -> None:
    """refs/<revision> of Hub cache repo folder `folder` := sha: written whole beside it and renamed
    into place (a link there is replaced, never followed), owned as the refs folder is (huggingface_hub,
    as the session's user, may write it again)."""
    *parts, name = ["refs", *revision.split("/")]
    fd = open_folder(folder.parent, [folder.name, *parts], make=True)
    tmp = f".{name}.{os.getpid()}.tmp"
    try:
        out = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644, dir_fd=fd)
        try:
            os.write(out, sha.encode())
            st = os.fstat(fd)
            if os.geteuid() == 0:
                os.fchown(out, st.st_uid, st.st_gid)
        finally:
            os.close(out)
        os.replace(tmp, name, src_dir_fd=fd, dst_dir_fd=fd)
    finally:
        os.close(fd)


def verify_cached(folder: Path, sha: str, expected: dict[str, str]) -> dict[str, list[str]]:
    """Checks each file of commit `sha` in a Hub cache repo folder (models--o--n) against its expected
    hash. A file is "verified" when its snapshot entry leads to a blob of the repo's blobs named by
    that hash whose bytes hash to it (hashed once: hash_and_remember); "absent" when the snapshot has
    no entry; otherwise "removed": its snapshot entry and its blob (and the blob's record) are
    deleted, so a download fetches it again. Files without an expected hash are absent."""
    result: dict[str, list[str]] = {"verified": [], "removed": [], "absent": []}
    drop_symlinked_folders(folder)
    blobs = (folder / "blobs").resolve() if (folder / "blobs").exists() else None
    records = records_dir(folder)
    for name, want in sorted(expected.items()):
        entry = folder / "snapshots" / sha / name
        if not want or not os.path.lexists(entry):
            result["absent"].append(name)
            continue
        blob = entry.resolve()
        ours = blobs is not None and blob.parent == blobs and blob.name == want  # never a file elsewhere
        try:
            good = ours and (
                hashed_before(records, folder, blob) or (blob.is_file() and hash_and_remember(records, folder, blob, want))
            )
        except OSError:
            good = False
        if good:
            result["verified"].append(name)
            continue
        remove_in(folder.parent, f"{folder.name}/snapshots/{sha}/{name}")
        if ours:
            remove_in(folder.parent, f"{folder.name}/blobs/{want}")
        if records is not None:
            (records / folder.name / want).unlink(missing_ok=True)
        result["removed"].append(name)
    return result


def seal_snapshot(folder: Path, sha: str) -> dict[str, list[str]]:
    """After a download: every file of the snapshot checked against its blob's name (its Hub etag,
    which check compared with the Hub's hash), then sealed; one that does not verify is removed."""
    snapshot = folder / "snapshots" / sha
    entries = sorted(p for p in snapshot.rglob("*") if p.is_symlink() or p.is_file()) if snapshot.is_dir() else []
    expected = {p.relative_to(snapshot).as_posix(): p.resolve().name for p in entries}
    return verify_cached(folder, sha, expected)


def bytes_under(root: str) -> int:
    """Bytes stored under `root` (regular files, symlinks not followed; each inode once)."""
    total, seen = 0, set()
    for base, _, files in os.walk(root):
        for name in files:
            try:
                st = os.lstat(os.path.join(base, name))
            except OSError:
                continue
            if stat.S_ISREG(st.st_mode) and (st.st_dev, st.st_ino) not in seen:
                seen.add((st.st_dev, st.st_ino))
                total += st.st_blocks * 512
    return total


def cache_free(root: str, size_gb: float) -> int:
    """Free bytes on the cache volume: statvfs's, capped by its size (size_gb: the cloud's GB, 10^9
    bytes) less what it holds when known."""
    free = shutil.disk_usage(root).free
    if size_gb > 0:
        free = min(free, int(size_gb * fit.GB) - bytes_under(root))
    return max(free, 0)


def full_cache_message(root: str, free: int, needed: int, what: str) -> str:
    return (f"The cache volume at {root} has {free / fit.GIB:.1f} GiB free and this session needs {needed / fit.GIB:.1f} GiB "
            f"more on it ({what}): nothing was downloaded. Make a bigger cache (`gpu-session cache rm`, then "
            "`gpu-session cache create --size <GB>`), or start without it (`gpu-session up --no-cache`).")  # fmt: skip


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
    verified: dict[str, list[str]] = {}
    if args.verify:  # a cache shared with other sessions: trust no file before its hash is checked
        hashes = hub_hashes(info.siblings)
        folder = repo_folder(hf_constants.HF_HUB_CACHE, args.model)
        verified = verify_cached(folder, info.sha, {f: hashes.get(f, "") for f in download})
        missing = verified["absent"] + verified["removed"]
        if not missing and args.revision != info.sha:  # the revision leads to this commit when served offline
            write_ref(folder, args.revision, info.sha)
    else:
        # What an earlier converge downloaded of this commit is on the disk already: only the rest counts.
        missing = [f for f in download if not isinstance(try_to_load_from_cache(args.model, f, revision=info.sha), str)]
    weights_need = sum(files[f] for f in missing)
    engine_missing = bool(args.engine_at) and not os.path.exists(args.engine_at)
    engine_need = fit.ENGINE_DISK_GIB * fit.GIB if engine_missing else 0
    if args.cache_root:
        on_cache = fit.cache_need(weights_need if args.weights_in_cache else 0, engine_missing)
        free = cache_free(args.cache_root, args.cache_size_gb)
        if on_cache > free:
            fail(f"{args.model}: " + full_cache_message(args.cache_root, free, on_cache,
                 "the weights and the engine" if engine_need and args.weights_in_cache else "the engine" if engine_need else "the weights"))  # fmt: skip
        needed = 0 if args.weights_in_cache else weights_need
    else:
        needed = weights_need + engine_need
    free = shutil.disk_usage(args.data_root).free
    if needed > free:
        fail(f"{args.model}: this host has {free / fit.GIB:.1f} GiB of disk free in {args.data_root} and needs {needed / fit.GIB:.1f} GiB "
             "(the weights and the engine): give the instance a larger disk (--disk).")  # fmt: skip
    return {"sha": info.sha, "gated": bool(info.gated), "files": download, "weights_bytes": weights_bytes,
            "kv_bytes_per_token": kv or 0, "need_bytes": need, "max_model_len": max_model_len,
            "missing": missing, "cache": verified, "downloaded_before": read_marker(args.marker)}  # fmt: skip


def read_marker(path: str) -> dict:
    """What the role remembered of the last download ({"model", "revision", "sha", …}; root's, in a
    folder of root's), or {} when there is none or it does not parse: the download then runs."""
    if not path:
        return {}
    try:
        with open(path) as f:
            marker = json.load(f)
    except (OSError, ValueError):
        return {}
    return marker if isinstance(marker, dict) else {}


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


def seal_action(args) -> dict:
    sha = args.revision
    result = seal_snapshot(repo_folder(hf_constants.HF_HUB_CACHE, args.model), sha)
    if result["removed"]:
        fail(f"{args.model}: {', '.join(result['removed'])} did not match the Hub's hash after the download and "
             "was removed from the cache: run again to download it again.")  # fmt: skip
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("action", choices=["check", "download", "seal"])
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
    parser.add_argument(
        "--engine-at", default="", help="check: a path there once the engine is installed (until then its disk counts)"
    )
    parser.add_argument("--marker", default="", help="check: the role's record of the last download, to say it back")
    parser.add_argument(
        "--verify", action="store_true", help="check: verify every cached file of the revision against its Hub hash"
    )
    parser.add_argument(
        "--cache-root", default="", help="check: the cache volume (the engine, and the weights with --weights-in-cache)"
    )
    parser.add_argument("--cache-size-gb", type=float, default=0, help="check: the volume's size when capped (0: unknown)")
    parser.add_argument("--weights-in-cache", action="store_true", help="check: the weights are downloaded onto the cache volume")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:  # the small files read by check
        args.scratch = scratch
        print(json.dumps({"check": check, "download": download, "seal": seal_action}[args.action](args)))


if __name__ == "__main__":
    main()
