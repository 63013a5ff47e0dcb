"""A Hugging Face Hub subset: model info, tree listing, search, whoami and file resolution.

Enough of the wire behaviour that the unmodified `huggingface_hub` client (`model_info`,
`snapshot_download`, `hf download`) works: X-Repo-Commit, ETag / X-Linked-Etag / X-Linked-Size,
ranges, and the X-Error-Code header its errors are keyed on. HEAD on a file answers whoever may
download it (its size and etag, as `get_hf_file_metadata` reads them) even where the simulator holds
only the file's size; a gated entry answers 401 GatedRepo without a token and 403 GatedRepo to a
token not among its readers (the Hub's answers; huggingface_hub raises GatedRepoError for both); a
private entry answers whoever is not its reader as a missing repo does (401 RepoNotFound), metadata
and files alike.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from dataclasses import dataclass
from pathlib import Path

from . import hub_models, models
from .faults import with_faults
from .http import Request, Response, Router, json_response
from .hub_models import HubModel
from .world import World

# What a repo's default .gitattributes sends to LFS; the Hub also refuses non-LFS files over 10 MB.
LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".ckpt", ".h5", ".onnx", ".msgpack", ".model", ".npy", ".zip")
LFS_OVER = 10 * 1024 * 1024
COMMIT_RE = re.compile(r"^[0-9a-f]{40}$")
DATE = "2025-01-01T00:00:00.000Z"
# A valid simulator token that is no gated entry's reader: it reads metadata, and the files of gated
# entries without a readers list, but is answered 403 GatedRepo by those with one.
NON_READER_TOKEN = "hf_sim_not_a_reader"
DTYPES = {"bfloat16": ("BF16", 2), "float16": ("F16", 2), "float32": ("F32", 4)}  # config torch_dtype → safetensors dtype, bytes


@dataclass
class FileEntry:
    path: str
    size: int
    oid: str  # git blob id (of the LFS pointer, for LFS files)
    sha256: str | None  # LFS files only
    pointer_size: int = 0
    local: Path | bytes | None = None  # a file, content served from memory, or None: listed, not downloadable

    def json(self) -> dict:
        """The file's content as JSON ({} when it has none here, or is not JSON)."""
        if self.local is None:
            return {}
        try:
            return json.loads(self.local if isinstance(self.local, bytes) else self.local.read_bytes())
        except ValueError:
            return {}


@dataclass
class Repo:
    model: HubModel
    sha: str
    files: dict[str, FileEntry]
    parameters: dict[str, int] | None  # safetensors dtype → parameter count; None: no safetensors weights

    @property
    def config(self) -> dict:
        return self.files["config.json"].json() if "config.json" in self.files else {}


def _hub_error(status: int, code: str | None, message: str) -> Response:
    headers = {"X-Error-Code": code, "X-Error-Message": message} if code else {}
    return json_response({"error": message}, status, headers)


def _status_error(status: int) -> Response:
    return _hub_error(status, None, "Too Many Requests" if status == 429 else "Internal Error")


def _is_lfs(name: str, size: int) -> bool:
    return name.endswith(LFS_SUFFIXES) or size > LFS_OVER


def _lfs_entry(name: str, size: int, sha: str, local: Path | None) -> FileEntry:
    pointer = f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha}\nsize {size}\n".encode()
    return FileEntry(name, size, models.git_blob_sha1(pointer), sha, len(pointer), local)


def _index_built(model: HubModel, folder: Path) -> Repo:
    files = {}
    for p in sorted(folder.rglob("*")):
        if not p.is_file() or p.name == ".done":
            continue
        rel = p.relative_to(folder).as_posix()
        size = p.stat().st_size
        if _is_lfs(rel, size):
            files[rel] = _lfs_entry(rel, size, models.sha256_file(p), p)
        else:
            files[rel] = FileEntry(rel, size, models.git_blob_sha1(p.read_bytes()), None, 0, p)
    params = sum(models.safetensors_params(f.local) for f in files.values() if f.path.endswith(".safetensors"))
    return Repo(model, _commit(model.repo_id, files), files, {"BF16": params})


def _index_metadata(model: HubModel) -> Repo:
    files = {}
    for name, value in model.files.items():
        data = hub_models.content(value)
        if data is not None:
            files[name] = FileEntry(name, len(data), models.git_blob_sha1(data), None, 0, data)
        elif _is_lfs(name, value):
            files[name] = _lfs_entry(name, value, hashlib.sha256(f"{model.repo_id}/{name}".encode()).hexdigest(), None)
        else:
            files[name] = FileEntry(name, value, hashlib.sha1(f"{model.repo_id}/{name}".encode()).hexdigest(), None)
    repo = Repo(model, _commit(model.repo_id, files), files, None)
    repo.parameters = _parameters(repo)
    return repo


def _parameters(repo: Repo) -> dict[str, int] | None:
    """What the Hub reports of a metadata-only entry's safetensors weights: the index's total_size
    over the bytes of the config's torch_dtype; without an index, the files' sizes over it (their
    headers counted in). None where there are no safetensors, as the Hub does for .bin or GGUF repos."""
    weights = [f for f in repo.files.values() if f.path.endswith(".safetensors") and "/" not in f.path]
    if not weights:
        return None
    config = repo.config
    dtype, width = DTYPES.get(config.get("torch_dtype") or config.get("llm_config", {}).get("torch_dtype"), DTYPES["bfloat16"])
    index = repo.files.get("model.safetensors.index.json")
    total = index.json().get("metadata", {}).get("total_size") if index else None
    if total is None:
        total = sum(f.size for f in weights if "-of-" in f.path) or weights[0].size
    return {dtype: total // width}


def _commit(repo_id: str, files: dict[str, FileEntry]) -> str:
    h = hashlib.sha1(repo_id.encode())
    for name in sorted(files):
        h.update(f"{name}:{files[name].oid}".encode())
    return h.hexdigest()


class Hub:
    def __init__(self, world: World, cache: Path):
        self.world = world
        self.cache = cache
        self.catalog: dict[str, HubModel] = {}
        self._repos: dict[str, Repo] = {}
        self._lock = threading.Lock()
        self.add(hub_models.builtin() + models.built_models())
        self.accept_tokens([NON_READER_TOKEN])

    def add(self, entries: list[HubModel]) -> None:
        """More entries (`--hub-extra`); one with an id already here replaces it. Tokens named as
        readers become valid simulator tokens."""
        for m in entries:
            self.catalog[m.repo_id] = m
            self.accept_tokens(m.readers or [])

    def accept_tokens(self, tokens: list[str]) -> None:
        with self.world.lock:
            self.world.hf_tokens.extend(t for t in tokens if t not in self.world.hf_tokens)

    def repo(self, repo_id: str) -> Repo | None:
        model = self.catalog.get(repo_id)
        if model is None:
            return None
        with self._lock:  # one build at a time; later callers get the cached index
            cached = self._repos.get(repo_id)
            if cached is None or cached.model is not model:  # new, or replaced since
                if model.built:
                    cached = _index_built(model, models.ensure_built(self.cache, repo_id))
                else:
                    cached = _index_metadata(model)
                self._repos[repo_id] = cached
            return cached

    def token(self, req: Request) -> str | None:
        """The request's token, if it is one the simulator knows."""
        auth = req.headers.get("authorization", "")
        token = auth[7:].strip() if auth.lower().startswith("bearer ") else None
        return token if token in self.world.hf_tokens else None

    @staticmethod
    def reads_private(model: HubModel, token: str | None) -> bool:
        """Whether `token` (a known one, or None) may see a private entry: its readers, else any token."""
        return token is not None and (model.readers is None or token in model.readers)

    def denied(self, model: HubModel, token: str | None) -> Response | None:
        """Whether a gated entry's files are closed to this token, as the Hub answers it: 401 without
        a token, 403 to one not among the entry's readers (both X-Error-Code GatedRepo)."""
        if not model.gated:
            return None
        if token is None:
            return _hub_error(
                401,
                "GatedRepo",
                f"Access to model {model.repo_id} is restricted. You must have "
                "access to it and be authenticated to access it. Please log in.",
            )
        if model.readers is not None and token not in model.readers:
            return _hub_error(
                403,
                "GatedRepo",
                f"Access to model {model.repo_id} is restricted and you are not in the authorized list. "
                f"Visit https://huggingface.co/{model.repo_id} to ask for access.",
            )
        return None

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
        # What the Hub shows of config.json and tokenizer_config.json in model_info, to anyone.
        config = {k: v for k, v in repo.config.items() if k in ("architectures", "model_type", "auto_map", "quantization_config")}
        tokenizer = repo.files["tokenizer_config.json"].json() if "tokenizer_config.json" in repo.files else {}
        tokenizer = {
            k: v for k, v in tokenizer.items() if k in ("bos_token", "eos_token", "pad_token", "unk_token", "chat_template")
        }
        if tokenizer:
            config["tokenizer_config"] = tokenizer
        names = list(repo.files)
        kinds = [
            ("transformers", "config.json" in repo.files),
            ("safetensors", any(n.endswith(".safetensors") for n in names)),
            ("pytorch", any(n.endswith(".bin") for n in names)),
            ("gguf", any(n.endswith(".gguf") for n in names)),
            ("custom_code", "auto_map" in config),
        ]
        tags = list(dict.fromkeys([k for k, present in kinds if present] + [m.pipeline_tag, *m.tags]))
        info = {
            "_id": hashlib.md5(m.repo_id.encode()).hexdigest()[:24],
            "id": m.repo_id,
            "modelId": m.repo_id,
            "author": org,
            "sha": repo.sha,
            "lastModified": DATE,
            "createdAt": DATE,
            "private": m.private,
            "disabled": False,
            "gated": m.gated,
            "downloads": 0,
            "likes": 0,
            "tags": tags,
            "pipeline_tag": m.pipeline_tag,
            "cardData": {},
            "siblings": siblings,
            "spaces": [],
            "usedStorage": sum(f.size for f in repo.files.values()),
        }
        if "config.json" in repo.files:
            info |= {"library_name": "transformers", "config": config}
        if repo.parameters:
            info["safetensors"] = {"parameters": repo.parameters, "total": sum(repo.parameters.values())}
        return info

    # --- handlers --------------------------------------------------------------------------

    def _lookup(self, org: str | None, name: str, rev: str, req: Request) -> tuple[Repo | None, Response | None]:
        repo_id = f"{org}/{name}" if org else name
        try:
            repo = self.repo(repo_id)
        except models.ModelUnavailable as e:
            return None, _hub_error(503, None, str(e))
        if repo is None or repo.model.private and not self.reads_private(repo.model, self.token(req)):
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
        repo, err = self._lookup(parts[0] if len(parts) == 2 else None, parts[-1], rev, req)
        if err:
            return err
        blobs = req.query.get("blobs", "").lower() == "true" or "siblings" in req.query.get("expand[]", "")
        return json_response(self.info_json(repo, blobs))

    def tree(self, req: Request) -> Response:
        repo, err = self._lookup(req.params["org"], req.params["name"], req.params["rev"], req)
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
        repo, err = self._lookup(req.params["org"], req.params["name"], req.params["rev"], req)
        if err:
            return err
        f = repo.files.get(req.params["path"])
        if f is None:
            return _hub_error(404, "EntryNotFound", f'{req.params["path"]} does not exist on "{req.params["rev"]}"')
        denied = self.denied(repo.model, self.token(req))
        if denied:
            return denied
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
        if req.method == "HEAD":  # whoever may download a file learns its size and etag, downloadable here or not
            return Response(200, b"", headers | {"Content-Length": str(f.size)})
        if f.local is None:
            return _hub_error(404, "EntryNotFound", f"{f.path}: the simulator serves this model's metadata only, not its weights")
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
        token = self.token(req)
        found = [
            m for m in self.catalog.values()
            if all(w in m.repo_id.lower() for w in words) and (not m.private or self.reads_private(m, token))
        ]  # fmt: skip
        return json_response(
            [
                {
                    "_id": hashlib.md5(m.repo_id.encode()).hexdigest()[:24],
                    "id": m.repo_id,
                    "modelId": m.repo_id,
                    "likes": 0,
                    "downloads": 0,
                    "private": m.private,
                    "pipeline_tag": m.pipeline_tag,
                    "tags": ["transformers", m.pipeline_tag],
                    "createdAt": DATE,
                }
                for m in found[:limit]
            ]
        )

    def whoami(self, req: Request) -> Response:
        if self.token(req) is None:
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
