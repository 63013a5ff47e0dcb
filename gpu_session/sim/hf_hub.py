"""A Hugging Face Hub subset: model info, tree listing, search, whoami and file resolution.

Enough of the wire behaviour that the unmodified `huggingface_hub` client (`model_info`,
`snapshot_download`, `hf download`) works: X-Repo-Commit, ETag / X-Linked-Etag / X-Linked-Size,
ranges, and the X-Error-Code header its errors are keyed on.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
import threading
from dataclasses import dataclass
from pathlib import Path

from . import models
from .faults import with_faults
from .http import Request, Response, Router, json_response
from .world import World

LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".gguf", ".pth")
COMMIT_RE = re.compile(r"^[0-9a-f]{40}$")
DATE = "2025-01-01T00:00:00.000Z"


@dataclass
class FileEntry:
    path: str
    size: int
    oid: str  # git blob id (of the LFS pointer, for LFS files)
    sha256: str | None  # LFS files only
    pointer_size: int = 0
    local: Path | bytes | None = None  # a file, content served from memory, or None: not downloadable


@dataclass
class Repo:
    model: models.HubModel
    sha: str
    files: dict[str, FileEntry]


def _hub_error(status: int, code: str | None, message: str) -> Response:
    headers = {"X-Error-Code": code, "X-Error-Message": message} if code else {}
    return json_response({"error": message}, status, headers)


def _status_error(status: int) -> Response:
    return _hub_error(status, None, "Too Many Requests" if status == 429 else "Internal Error")


def _index_built(model: models.HubModel, folder: Path) -> Repo:
    files = {}
    for p in sorted(folder.rglob("*")):
        if not p.is_file() or p.name == ".done":
            continue
        rel = p.relative_to(folder).as_posix()
        size = p.stat().st_size
        if p.suffix in LFS_SUFFIXES:
            sha = models.sha256_file(p)
            pointer = f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha}\nsize {size}\n".encode()
            files[rel] = FileEntry(rel, size, models.git_blob_sha1(pointer), sha, len(pointer), p)
        else:
            files[rel] = FileEntry(rel, size, models.git_blob_sha1(p.read_bytes()), None, 0, p)
    params = sum(models.safetensors_params(f.local) for f in files.values() if f.path.endswith(".safetensors"))
    return Repo(dataclasses.replace(model, params=params), _commit(model.repo_id, files), files)


def _index_metadata(model: models.HubModel) -> Repo:
    import json

    files = {}
    for name, size in model.files.items():
        if name == "config.json":
            data = json.dumps(model.config, indent=2).encode()
            files[name] = FileEntry(name, len(data), models.git_blob_sha1(data), None, 0, data)
        else:
            fake = hashlib.sha256(f"{model.repo_id}/{name}".encode()).hexdigest()
            lfs = name.endswith(LFS_SUFFIXES)
            files[name] = FileEntry(name, size, hashlib.sha1(fake.encode()).hexdigest(), fake if lfs else None, 134 if lfs else 0)
    return Repo(model, _commit(model.repo_id, files), files)


def _commit(repo_id: str, files: dict[str, FileEntry]) -> str:
    h = hashlib.sha1(repo_id.encode())
    for name in sorted(files):
        h.update(f"{name}:{files[name].oid}".encode())
    return h.hexdigest()


class Hub:
    def __init__(self, world: World, cache: Path):
        self.world = world
        self.cache = cache
        self.catalog = {m.repo_id: m for m in models.METADATA_MODELS + models.built_models()}
        self._repos: dict[str, Repo] = {}
        self._lock = threading.Lock()

    def repo(self, repo_id: str) -> Repo | None:
        model = self.catalog.get(repo_id)
        if model is None:
            return None
        with self._lock:  # one build at a time; later callers get the cached index
            if repo_id not in self._repos:
                if model.built:
                    self._repos[repo_id] = _index_built(model, models.ensure_built(self.cache, repo_id))
                else:
                    self._repos[repo_id] = _index_metadata(model)
            return self._repos[repo_id]

    def authorized(self, req: Request) -> bool:
        auth = req.headers.get("authorization", "")
        return auth.lower().startswith("bearer ") and auth[7:].strip() in self.world.hf_tokens

    # --- JSON shapes -----------------------------------------------------------------------

    def info_json(self, repo: Repo, blobs: bool) -> dict:
        m = repo.model
        org = m.repo_id.split("/")[0] if "/" in m.repo_id else None
        siblings = []
        for f in repo.files.values():
            s = {"rfilename": f.path}
            if blobs:
                s |= {"size": f.size, "blobId": f.oid}
                if f.sha256:
                    s["lfs"] = {"sha256": f.sha256, "size": f.size, "pointerSize": f.pointer_size}
            siblings.append(s)
        config = {k: m.config[k] for k in ("architectures", "model_type") if k in m.config}
        if m.built:
            config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama"}
        return {
            "_id": hashlib.md5(m.repo_id.encode()).hexdigest()[:24],
            "id": m.repo_id,
            "modelId": m.repo_id,
            "author": org,
            "sha": repo.sha,
            "lastModified": DATE,
            "createdAt": DATE,
            "private": False,
            "disabled": False,
            "gated": "manual" if m.gated else False,
            "downloads": 0,
            "likes": 0,
            "library_name": "transformers",
            "tags": ["transformers", "safetensors", m.pipeline_tag, *m.tags],
            "pipeline_tag": m.pipeline_tag,
            "config": config,
            "cardData": {},
            "siblings": siblings,
            "spaces": [],
            "safetensors": {"parameters": {m.dtype: m.params}, "total": m.params},
            "usedStorage": sum(f.size for f in repo.files.values()),
        }

    # --- handlers --------------------------------------------------------------------------

    def _lookup(self, org: str | None, name: str, rev: str) -> tuple[Repo | None, Response | None]:
        repo_id = f"{org}/{name}" if org else name
        try:
            repo = self.repo(repo_id)
        except models.ModelUnavailable as e:
            return None, _hub_error(503, None, str(e))
        if repo is None:
            return None, _hub_error(401, "RepoNotFound", "Repository not found")
        if rev not in ("main", repo.sha):
            return None, _hub_error(404, "RevisionNotFound", f"Invalid rev id: {rev}")
        return repo, None

    def model_info(self, req: Request) -> Response:
        parts = req.params["rest"].split("/")
        # {org}/{name}[/revision/{rev}] or {name}[/revision/{rev}]
        rev = "main"
        if len(parts) >= 3 and parts[-2] == "revision":
            rev, parts = parts[-1], parts[:-2]
        if len(parts) == 3 and parts[2] == "tree":  # .../tree with no revision
            parts = parts[:2]
        if len(parts) > 2 or not parts[-1]:
            return _hub_error(404, None, "Not Found")
        repo, err = self._lookup(parts[0] if len(parts) == 2 else None, parts[-1], rev)
        if err:
            return err
        blobs = req.query.get("blobs", "").lower() == "true" or "siblings" in req.query.get("expand[]", "")
        return json_response(self.info_json(repo, blobs))

    def tree(self, req: Request) -> Response:
        repo, err = self._lookup(req.params["org"], req.params["name"], req.params["rev"])
        if err:
            return err
        prefix = (req.params.get("path") or "").strip("/")
        recursive = req.query.get("recursive", "").lower() in ("1", "true")
        out, dirs = [], set()
        for f in repo.files.values():
            if prefix and not f.path.startswith(prefix + "/"):
                continue
            rest = f.path[len(prefix) + 1 :] if prefix else f.path
            if "/" in rest and not recursive:
                dirs.add((prefix + "/" if prefix else "") + rest.split("/")[0])
                continue
            item = {"type": "file", "oid": f.oid, "size": f.size, "path": f.path}
            if f.sha256:
                item["lfs"] = {"oid": f.sha256, "size": f.size, "pointerSize": f.pointer_size}
            out.append(item)
        out += [{"type": "directory", "oid": hashlib.sha1(d.encode()).hexdigest(), "size": 0, "path": d} for d in sorted(dirs)]
        return json_response(out)

    def resolve(self, req: Request) -> Response:
        repo, err = self._lookup(req.params["org"], req.params["name"], req.params["rev"])
        if err:
            return err
        f = repo.files.get(req.params["path"])
        if f is None:
            return _hub_error(404, "EntryNotFound", f'{req.params["path"]} does not exist on "{req.params["rev"]}"')
        if repo.model.gated and not self.authorized(req):
            return _hub_error(
                401,
                "GatedRepo",
                f"Access to model {repo.model.repo_id} is restricted. You must have "
                "access to it and be authenticated to access it. Please log in.",
            )
        if f.local is None:
            return _hub_error(404, "EntryNotFound", f"{f.path}: the simulator serves this model's metadata only, not its weights")
        etag = f.sha256 or f.oid
        headers = {
            "X-Repo-Commit": repo.sha,
            "ETag": f'"{etag}"',
            "Accept-Ranges": "bytes",
            "Content-Type": "application/octet-stream",
            "Content-Disposition": f'inline; filename="{Path(f.path).name}"',
        }
        if f.sha256:
            headers |= {"X-Linked-Etag": f'"{f.sha256}"', "X-Linked-Size": str(f.size)}
        start, end = 0, f.size - 1
        status = 200
        m = re.match(r"bytes=(\d*)-(\d*)$", req.headers.get("range", ""))
        if m and (m.group(1) or m.group(2)):
            if m.group(1):
                start = int(m.group(1))
                end = min(int(m.group(2)), f.size - 1) if m.group(2) else f.size - 1
            else:
                start = max(0, f.size - int(m.group(2)))
            if start >= f.size:
                return Response(416, b"", {"Content-Range": f"bytes */{f.size}"})
            status = 206
            headers["Content-Range"] = f"bytes {start}-{end}/{f.size}"
        headers["Content-Length"] = str(end - start + 1)
        source = f.local

        def stream(out):
            if isinstance(source, bytes):
                out.write(source[start : end + 1])
                return
            with open(source, "rb") as fh:
                fh.seek(start)
                left = end - start + 1
                while left > 0:
                    chunk = fh.read(min(1 << 20, left))
                    if not chunk:
                        break
                    out.write(chunk)
                    left -= len(chunk)

        return Response(status, stream, headers)

    def search(self, req: Request) -> Response:
        words = req.query.get("search", "").lower().split()
        limit = int(req.query.get("limit") or 20)
        found = [m for m in self.catalog.values() if all(w in m.repo_id.lower() for w in words)]
        return json_response(
            [
                {
                    "_id": hashlib.md5(m.repo_id.encode()).hexdigest()[:24],
                    "id": m.repo_id,
                    "modelId": m.repo_id,
                    "likes": 0,
                    "downloads": 0,
                    "private": False,
                    "pipeline_tag": m.pipeline_tag,
                    "tags": ["transformers", m.pipeline_tag],
                    "createdAt": DATE,
                }
                for m in found[:limit]
            ]
        )

    def whoami(self, req: Request) -> Response:
        if not self.authorized(req):
            return json_response({"error": "Invalid credentials in Authorization header"}, 401)
        return json_response(
            {
                "type": "user",
                "id": "sim-user",
                "name": "sim-user",
                "fullname": "Simulator User",
                "email": None,
                "emailVerified": True,
                "isPro": False,
                "orgs": [],
                "auth": {"type": "access_token", "accessToken": {"displayName": "sim", "role": "read"}},
            }
        )


def mount(router: Router, world: World, cache: Path) -> Hub:
    hub = Hub(world, cache)

    def route(method, pattern, handler, op):
        router.add(method, pattern, with_faults(world, "hf", op, handler, _status_error, lambda: _status_error(503)))

    route("GET", "/api/whoami-v2", hub.whoami, "whoami")
    route("GET", "/api/models", hub.search, "search")
    route("GET", "/api/models/{org}/{name}/tree/{rev}", hub.tree, "tree")
    route("GET", "/api/models/{org}/{name}/tree/{rev}/{path:path}", hub.tree, "tree")
    route("GET", "/api/models/{rest:path}", hub.model_info, "model_info")
    route("GET", "/{org}/{name}/resolve/{rev}/{path:path}", hub.resolve, "resolve")
    return hub
