"""The simulated Hub's metadata-only entries: whole repos (every file with its size, the content of
their small JSON and text files), read from YAML.

One format, one loader: the built-in entries (hub_models.yaml, beside this module) and whoever
rehearses their own model (`invoke sim --hub-extra FILE`, at start or into a running simulator):

    models:
      - id: org/name                 # Hub id
        gated: false                 # false | auto | manual
        private: false               # true: only a token reads it (its readers, if listed); the Hub's 401 RepoNotFound to others
        readers: [hf_tokenA]         # gated or private only: tokens that may download files; absent = any token
        pipeline_tag: text-generation
        tags: []
        files:                       # every file of the repo: a size in bytes, or the content of a small file
          config.json: {json: {architectures: [LlamaForCausalLM], num_hidden_layers: 32}}
          chat_template.jinja: {text: "{{ messages }}"}
          model-00001-of-00002.safetensors: 4976698672

A file given by its content is served as that content (JSON written with an indent of 2, so its
size is that of what is served); a file given by its size is listed, and answers HEAD, but cannot
be downloaded. An entry whose id is already in the catalog replaces it.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from gpu_session.errors import our_command

BUILTIN = Path(__file__).with_name("hub_models.yaml")
KEYS = ("id", "gated", "private", "readers", "pipeline_tag", "tags", "files")
# What huggingface_hub's validate_repo_id accepts, with the owner required: letters, digits, - _ .,
# neither "--" nor ".." (huggingface_hub/utils/_validators.py), at most 96 characters.
REPO_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


class BadHubEntry(ValueError):
    """A --hub-extra file (or hub_models.yaml) that does not follow the format; the message is one line."""


@dataclass
class HubModel:
    repo_id: str
    gated: bool | str = False  # False | "auto" | "manual"
    readers: list[str] | None = None  # gated or private: the tokens that may read it; None: any valid token
    pipeline_tag: str = "text-generation"
    tags: list[str] = field(default_factory=list)
    # name → size in bytes | {"json": object} | {"text": str}; built models: empty (their build folder's files)
    files: dict[str, int | dict] = field(default_factory=dict)
    built: bool = False  # True: files come from the model's build folder (models.ensure_built)
    private: bool = False  # only tokens read it (its readers, if listed): anyone else is told it does not exist


def content(value: int | dict) -> bytes | None:
    """What a file declared as `value` serves: its content's bytes, or None for a size alone."""
    if isinstance(value, dict) and "json" in value:
        return json.dumps(value["json"], indent=2).encode()
    if isinstance(value, dict):
        return value["text"].encode()
    return None


def parse(text: str, source: str) -> list[HubModel]:
    """The entries of one file in the format above; BadHubEntry, naming the entry and field, otherwise."""
    try:
        doc = yaml.load(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))  # libyaml's: the built-ins are 0.5 MB
    except yaml.YAMLError as e:
        where = getattr(e, "problem_mark", None)
        at = f" at line {where.line + 1}" if where else ""
        raise BadHubEntry(f"{source}: not valid YAML{at}: {getattr(e, 'problem', None) or e}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("models"), list):
        raise BadHubEntry(
            f"{source}: expected a top-level `models:` list of entries (see {our_command('sim --help')} and the README)"
        )
    return [_entry(raw, f"{source}: models[{i}]") for i, raw in enumerate(doc["models"])]


def builtin() -> list[HubModel]:
    return parse(BUILTIN.read_text(), "gpu_session/sim/hub_models.yaml")


def _entry(raw, where: str) -> HubModel:
    if not isinstance(raw, dict):
        raise BadHubEntry(f"{where}: an entry is a mapping with id, gated, private, readers, pipeline_tag, tags and files")
    repo_id = raw.get("id")
    if repo_id is None:
        raise BadHubEntry(f"{where}: missing id (the Hub id, org/name)")
    if not isinstance(repo_id, str) or not REPO_ID.match(repo_id) or "--" in repo_id or ".." in repo_id or len(repo_id) > 96:
        raise BadHubEntry(
            f"{where}: id {repo_id!r} is not a Hub id: org/name of letters, digits, '-', '_' and '.' (no '--' or '..')"
        )
    where = f"{where} ({repo_id})"
    unknown = sorted(set(raw) - set(KEYS))
    if unknown:
        raise BadHubEntry(f"{where}: unknown field {unknown[0]!r}; an entry has {', '.join(KEYS)}")
    gated = raw.get("gated", False)
    if not (gated is False or gated in ("auto", "manual")):
        raise BadHubEntry(f"{where}: gated must be false, auto or manual, not {gated!r}")
    private = raw.get("private", False)
    if not isinstance(private, bool):
        raise BadHubEntry(f"{where}: private must be true or false, not {private!r}")
    readers = raw.get("readers")
    if readers is not None:
        if gated is False and not private:
            raise BadHubEntry(
                f"{where}: readers apply to gated or private entries only: set gated to manual or auto, "
                "or private to true, or remove readers"
            )
        if not isinstance(readers, list) or not all(isinstance(t, str) and t.strip() == t and t for t in readers):
            raise BadHubEntry(f"{where}: readers must be a list of tokens (strings without spaces), not {readers!r}")
    tag = raw.get("pipeline_tag", "text-generation")
    if not isinstance(tag, str):
        raise BadHubEntry(f"{where}: pipeline_tag must be a string such as text-generation, not {tag!r}")
    tags = raw.get("tags") or []
    if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
        raise BadHubEntry(f"{where}: tags must be a list of strings, not {tags!r}")
    files = raw.get("files")
    if not isinstance(files, dict) or not files:
        raise BadHubEntry(f"{where}: files must map every file of the repo to its size in bytes or {{json: …}} / {{text: …}}")
    for name, value in files.items():
        _check_file(name, value, where)
    return HubModel(repo_id, gated, list(readers) if readers is not None else None, tag, list(tags), dict(files), private=private)


def _check_file(name, value, where: str) -> None:
    if not isinstance(name, str) or not name or name.startswith("/") or ".." in name.split("/") or name.endswith("/"):
        raise BadHubEntry(
            f"{where}: files: {name!r} is not a file path inside a repo (such as config.json or original/params.json)"
        )
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return
    if isinstance(value, dict) and len(value) == 1 and ("json" in value or isinstance(value.get("text"), str)):
        try:
            json.dumps(value.get("json"))
        except (TypeError, ValueError):
            raise BadHubEntry(f"{where}: files: {name}: its json is not JSON (YAML dates and the like are not)") from None
        return
    raise BadHubEntry(
        f"{where}: files: {name}: {value!r} is neither a size in bytes nor {{json: <content>}} nor {{text: <content>}}"
    )
