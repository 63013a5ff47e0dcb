"""The unmodified huggingface_hub client (and the `hf` CLI) against the simulated Hub."""

from __future__ import annotations

import json
import signal
import struct
import subprocess
import sys
from pathlib import Path

import jinja2
import pytest
import requests
from huggingface_hub import HfApi, get_hf_file_metadata, hf_hub_url, snapshot_download
from huggingface_hub.errors import (
    EntryNotFoundError,
    GatedRepoError,
    HfHubHTTPError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from tokenizers import Tokenizer

from gpu_session import sizing
from gpu_session.sim import hub_models
from gpu_session.sim.hf_hub import NON_READER_TOKEN
from gpu_session.sim.models import KNOWN_REPLIES, LONG_CONTEXT, TINY_LONG, TINY_TEXT

TINY = "gpu-session/tiny-chat"
BUILTIN = {m.repo_id: m for m in hub_models.builtin()}
MISTRAL = "mistralai/Mistral-7B-Instruct-v0.3"
GEMMA = "google/gemma-2-9b-it"  # gated, with a readers list
READER = "hf_sim_reader"  # gemma's one reader


# huggingface_hub reads HF_ENDPOINT once, at import; a process started after `eval "$(invoke sim)"`
# has it, a test process has to pass the endpoint explicitly.
@pytest.fixture
def hub(sim) -> HfApi:
    return HfApi(endpoint=sim.env()["HF_ENDPOINT"], token=False)


def test_model_info_of_the_built_model(hub):
    info = hub.model_info(TINY)
    assert info.pipeline_tag == "text-generation" and info.gated is False
    assert {s.rfilename for s in info.siblings} >= {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"}
    assert info.safetensors.parameters == {"BF16": info.safetensors.total} and info.safetensors.total > 100_000
    assert len(info.sha) == 40
    assert hub.model_info(TINY, revision=info.sha).sha == info.sha
    with pytest.raises(RevisionNotFoundError):
        hub.model_info(TINY, revision="no-such-branch")


def test_the_built_model_is_private_on_disk(sim, hub):
    """Files 0600 and folders 0700, as everything under our state folder (save_pretrained follows
    the umask)."""
    hub.model_info(TINY)
    [folder] = (sim.state_dir / "models").glob(f"v*/{TINY.replace('/', '--')}")
    modes = {p.relative_to(folder).as_posix() or ".": oct(p.stat().st_mode & 0o777) for p in [folder, *folder.rglob("*")]}
    assert modes["."] == "0o700" and modes["model.safetensors"] == "0o600", modes
    assert {m for p, m in modes.items() if (folder / p).is_file()} == {"0o600"}, modes


@pytest.mark.parametrize(
    "repo, params, gated, tag",
    [
        ("meta-llama/Llama-3.1-8B-Instruct", 8_030_261_248, "manual", "text-generation"),
        ("meta-llama/Llama-3.1-70B-Instruct", 70_553_706_496, "manual", "text-generation"),
        ("Qwen/Qwen2.5-VL-7B-Instruct", 8_292_166_656, False, "image-text-to-text"),
    ],
)
def test_metadata_of_real_model_ids_for_sizing(hub, repo, params, gated, tag):
    info = hub.model_info(repo, files_metadata=True)
    assert (info.safetensors.total, info.gated, info.pipeline_tag) == (params, gated, tag)
    assert sum(s.size for s in info.siblings if s.rfilename.endswith(".safetensors")) > params  # 2 bytes each


def test_unknown_repo(hub):
    with pytest.raises(RepositoryNotFoundError):
        hub.model_info("nobody/nothing")


def test_snapshot_download_gives_a_loadable_model(hub, tmp_path):
    folder = Path(snapshot_download(TINY, cache_dir=tmp_path / "cache", endpoint=hub.endpoint))
    config = json.loads((folder / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["hidden_size"] // config["num_attention_heads"] == 64  # vLLM's CPU kernels reject 16

    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    text = "Hello! How can I help you today?"
    assert tok.decode(tok.encode(text).ids) == text
    assert tok.get_vocab_size() == config["vocab_size"]

    tok_config = json.loads((folder / "tokenizer_config.json").read_text())
    prompt = (
        jinja2.Environment()
        .from_string(tok_config["chat_template"])
        .render(messages=[{"role": "user", "content": "hi"}], add_generation_prompt=True, bos_token=tok_config["bos_token"])
    )
    assert prompt == (
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )
    for special in ("<|begin_of_text|>", "<|eot_id|>", "<|start_header_id|>"):
        assert tok.token_to_id(special) is not None

    raw = (folder / "model.safetensors").read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    header.pop("__metadata__")
    h, v = config["hidden_size"], config["vocab_size"]
    assert header["model.embed_tokens.weight"]["shape"] == [v, h]
    assert header["model.layers.1.mlp.down_proj.weight"]["shape"] == [h, config["intermediate_size"]]
    assert {t["dtype"] for t in header.values()} == {"BF16"}
    assert len(raw) - 8 - n == 2 * hub.model_info(TINY).safetensors.total  # every parameter, once


def test_hf_cli_download(sim_env, tmp_path):
    hf = Path(sys.executable).with_name("hf")
    out = subprocess.run([str(hf), "download", TINY, "config.json", "--local-dir", str(tmp_path)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "llama"


def test_gated_needs_a_token(sim, hub, tmp_path):
    repo = "meta-llama/Llama-3.1-8B-Instruct"
    with pytest.raises(GatedRepoError):
        hub.hf_hub_download(repo, "config.json", cache_dir=tmp_path)
    authed = HfApi(endpoint=hub.endpoint, token=sim.hf_token)
    path = authed.hf_hub_download(repo, "config.json", cache_dir=tmp_path)
    assert json.loads(Path(path).read_text())["num_key_value_heads"] == 8
    with pytest.raises(EntryNotFoundError):  # metadata only: no weights to download here
        authed.hf_hub_download(repo, "model-00001-of-00004.safetensors", cache_dir=tmp_path)


def test_ranges_search_whoami(sim):
    base = sim.env()["HF_ENDPOINT"]
    url = f"{base}/{TINY}/resolve/main/config.json"
    full = requests.get(url).content
    part = requests.get(url, headers={"Range": "bytes=10-19"})
    assert part.status_code == 206 and part.content == full[10:20]
    assert part.headers["Content-Range"] == f"bytes 10-19/{len(full)}"
    assert requests.head(url).headers["X-Repo-Commit"] == HfApi(endpoint=base).model_info(TINY).sha
    found = [m.id for m in HfApi(endpoint=base).list_models(search="llama-3.1")]
    assert found == ["meta-llama/Llama-3.1-8B-Instruct", "meta-llama/Llama-3.1-70B-Instruct"]
    assert HfApi(endpoint=base, token=sim.hf_token).whoami()["name"] == "sim-user"
    with pytest.raises(HfHubHTTPError):
        HfApi(endpoint=base, token="hf_wrong").whoami()


def test_hub_fault_is_an_http_error(sim, hub):
    sim.inject("hf:model_info", "500", times=10)
    try:
        with pytest.raises(HfHubHTTPError):
            hub.model_info(TINY)
    finally:
        sim.world.faults.clear()


def test_the_vision_model_loads_and_sees_an_image(hub, tmp_path):
    """The small vision-language model is a real Idefics3-style model: transformers loads it and runs it on an image."""
    import torch
    import transformers
    from PIL import Image

    info = hub.model_info("gpu-session/tiny-vision")
    assert info.pipeline_tag == "image-text-to-text"
    folder = snapshot_download("gpu-session/tiny-vision", cache_dir=tmp_path, endpoint=hub.endpoint)
    model = transformers.AutoModelForImageTextToText.from_pretrained(folder)
    assert sum(p.numel() for p in model.parameters()) == info.safetensors.total
    text = model.config.text_config
    assert text.hidden_size // text.num_attention_heads == 64
    processor = transformers.AutoProcessor.from_pretrained(folder)
    assert len(processor.tokenizer) == text.vocab_size  # no token outside the embedding table
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(images=[Image.new("RGB", (90, 60), "red")], text=prompt, return_tensors="pt")
    assert int((inputs["input_ids"] == model.config.image_token_id).sum()) == 4  # 56x56 in 14x14 patches, shuffled by 2
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert out.shape[1] == inputs["input_ids"].shape[1] + 4


# --- the built-in real shapes -----------------------------------------------------------------


def _siblings(hub, repo, token=False) -> dict[str, int]:
    info = HfApi(endpoint=hub.endpoint, token=token).model_info(repo, files_metadata=True)
    return {s.rfilename: s.size for s in info.siblings}


def _json(hub, repo, name, tmp_path, token):
    return json.loads(Path(hub.hf_hub_download(repo, name, cache_dir=tmp_path, token=token)).read_text())


@pytest.mark.parametrize("repo", sorted(BUILTIN))
def test_every_entry_lists_every_file_with_its_size(hub, repo):
    """Sizes as declared; a file given by its content is as big as the content served."""
    declared = BUILTIN[repo].files
    expected = {name: v if isinstance(v, int) else len(hub_models.content(v)) for name, v in declared.items()}
    assert _siblings(hub, repo) == expected


@pytest.mark.parametrize("repo", sorted(BUILTIN))
def test_small_files_download_as_declared(sim, hub, repo, tmp_path):
    token = READER if BUILTIN[repo].readers else sim.hf_token
    small = [n for n in ("config.json", "tokenizer_config.json", "model.safetensors.index.json", "pytorch_model.bin.index.json",
                         "chat_template.jinja") if n in BUILTIN[repo].files]  # fmt: skip
    for name in small:
        path = Path(hub.hf_hub_download(repo, name, cache_dir=tmp_path, token=token))
        declared = BUILTIN[repo].files[name]
        assert (json.loads(path.read_text()) if "json" in declared else path.read_text()) == next(iter(declared.values()))
        assert path.stat().st_size == get_hf_file_metadata(hf_hub_url(repo, name, endpoint=hub.endpoint), token=token).size


def test_mistral_as_the_real_repo(sim, hub, tmp_path):
    """consolidated.safetensors beside the shards: only the index says which are the weights to load."""
    sizes = _siblings(hub, MISTRAL)
    shards = {
        "model-00001-of-00003.safetensors": 4_949_453_792,
        "model-00002-of-00003.safetensors": 4_999_819_336,
        "model-00003-of-00003.safetensors": 4_546_807_800,
    }
    assert sizes["consolidated.safetensors"] == 14_496_078_512
    assert {n: sizes[n] for n in shards} == shards
    assert {"params.json", "tokenizer.model.v3", "tokenizer.json", "tokenizer_config.json"} <= set(sizes)
    assert {n for n in sizes if n.endswith(".safetensors")} == {"consolidated.safetensors", *shards}
    index = _json(hub, MISTRAL, "model.safetensors.index.json", tmp_path, sim.hf_token)
    assert set(index["weight_map"].values()) == set(shards)
    assert index["metadata"]["total_size"] == 2 * 7_248_023_552
    info = hub.model_info(MISTRAL)
    assert info.safetensors.total == 7_248_023_552 and info.gated == "auto"
    assert "chat_template" in _json(hub, MISTRAL, "tokenizer_config.json", tmp_path, sim.hf_token)
    config = _json(hub, MISTRAL, "config.json", tmp_path, sim.hf_token)
    params = _json(hub, MISTRAL, "params.json", tmp_path, sim.hf_token)
    assert (config["num_key_value_heads"], config["torch_dtype"], params["n_kv_heads"]) == (8, "bfloat16", 8)


def test_llama_configs_are_the_real_ones(sim, hub, tmp_path):
    config = _json(hub, "meta-llama/Llama-3.1-8B-Instruct", "config.json", tmp_path, sim.hf_token)
    assert config["rope_scaling"]["rope_type"] == "llama3" and config["max_position_embeddings"] == 131072
    assert (config["num_key_value_heads"], config["torch_dtype"]) == (8, "bfloat16")
    assert _json(hub, "meta-llama/Llama-3.2-1B-Instruct", "config.json", tmp_path, sim.hf_token)["head_dim"] == 64
    assert set(_siblings(hub, "meta-llama/Llama-3.2-1B-Instruct")) >= {"model.safetensors", "original/consolidated.00.pth"}


def test_bin_and_safetensors_of_the_same_weights(sim, hub, tmp_path):
    repo = "HuggingFaceH4/zephyr-7b-beta"
    names = set(_siblings(hub, repo))
    bins = {n for n in names if n.endswith(".bin") and n.startswith("pytorch_model-")}
    safetensors = {n for n in names if n.endswith(".safetensors")}
    assert len(bins) == 2 and len(safetensors) == 8
    st_index = _json(hub, repo, "model.safetensors.index.json", tmp_path, sim.hf_token)
    bin_index = _json(hub, repo, "pytorch_model.bin.index.json", tmp_path, sim.hf_token)
    assert set(st_index["weight_map"].values()) == safetensors and set(bin_index["weight_map"].values()) == bins
    assert st_index["weight_map"].keys() == bin_index["weight_map"].keys()


def test_a_model_without_a_chat_template(sim, hub, tmp_path):
    repo = "lmsys/vicuna-13b-v1.5"
    names = set(_siblings(hub, repo))
    assert "chat_template.jinja" not in names and not any(n.endswith(".safetensors") for n in names)
    assert "chat_template" not in _json(hub, repo, "tokenizer_config.json", tmp_path, sim.hf_token)
    assert set(_json(hub, repo, "pytorch_model.bin.index.json", tmp_path, sim.hf_token)["weight_map"].values()) == {
        n for n in names if n.endswith(".bin")
    }
    info = hub.model_info(repo)
    assert info.safetensors is None and "chat_template" not in info.config.get("tokenizer_config", {})


def test_custom_code_vision_model(sim, hub, tmp_path):
    repo = "OpenGVLab/InternVL2-8B"
    info = hub.model_info(repo)
    assert info.pipeline_tag == "image-text-to-text" and "custom_code" in info.tags and "auto_map" in info.config
    config = _json(hub, repo, "config.json", tmp_path, sim.hf_token)
    assert config["architectures"] == ["InternVLChatModel"] and "AutoModel" in config["auto_map"]
    llm = config["llm_config"]
    assert (llm["num_hidden_layers"], llm["num_key_value_heads"], llm["hidden_size"]) == (32, 8, 4096)


def test_gguf_only(hub):
    repo = "bartowski/Llama-3.2-3B-Instruct-GGUF"
    sizes = _siblings(hub, repo)
    ggufs = {n: s for n, s in sizes.items() if n.endswith(".gguf")}
    assert len(ggufs) >= 5 and all(s > 1_000_000_000 for s in ggufs.values())
    assert "config.json" not in sizes and not any(n.endswith((".safetensors", ".bin")) for n in sizes)
    info = HfApi(endpoint=hub.endpoint, token=False).model_info(repo)
    assert info.safetensors is None and "gguf" in info.tags


def test_chat_template_in_a_file_of_its_own(sim, hub, tmp_path):
    repo = "HuggingFaceTB/SmolLM3-3B"
    template = Path(hub.hf_hub_download(repo, "chat_template.jinja", cache_dir=tmp_path)).read_text()
    assert template == BUILTIN[repo].files["chat_template.jinja"]["text"] and "<|im_start|>" in template
    assert "chat_template" not in _json(hub, repo, "tokenizer_config.json", tmp_path, False)


# --- who may download what ------------------------------------------------------------------


def _head(hub, repo, name, token):
    return get_hf_file_metadata(hf_hub_url(repo, name, endpoint=hub.endpoint), token=token)


def test_gated_readers(sim, hub):
    """Metadata answers everyone; a gated file answers a reader, 403 GatedRepo to another valid
    token, 401 GatedRepo to no token: what an access check before renting a GPU sees."""
    weights = "model-00001-of-00004.safetensors"
    for token in (READER, NON_READER_TOKEN, sim.hf_token, False):
        assert HfApi(endpoint=hub.endpoint, token=token).model_info(GEMMA, files_metadata=True).gated == "manual"
    meta = _head(hub, GEMMA, weights, READER)
    assert meta.size == _siblings(hub, GEMMA)[weights] and meta.commit_hash == hub.model_info(GEMMA).sha and meta.etag
    for token, status in ((NON_READER_TOKEN, 403), (sim.hf_token, 403), (False, 401)):
        with pytest.raises(GatedRepoError) as e:
            _head(hub, GEMMA, weights, token)
        assert e.value.response.status_code == status
    with pytest.raises(GatedRepoError):
        hub.hf_hub_download(GEMMA, "config.json", token=NON_READER_TOKEN)
    with pytest.raises(EntryNotFoundError):  # a reader may, but the simulator holds no weights to send
        hub.hf_hub_download(GEMMA, weights, token=READER)
    assert {READER, NON_READER_TOKEN} <= set(sim.world.hf_tokens)
    assert HfApi(endpoint=hub.endpoint, token=READER).whoami()["name"] == "sim-user"


def test_gated_without_readers_opens_to_any_token(sim, hub):
    repo, weights = "meta-llama/Llama-3.1-8B-Instruct", "model-00004-of-00004.safetensors"
    for token in (sim.hf_token, NON_READER_TOKEN, READER):
        meta = _head(hub, repo, weights, token)
        assert meta.size == 1_168_138_808 and len(meta.commit_hash) == 40
    with pytest.raises(GatedRepoError) as e:
        _head(hub, repo, weights, False)
    assert e.value.response.status_code == 401


# --- tiny-chat-long -------------------------------------------------------------------------


def test_tiny_chat_long_is_tiny_chat_with_a_long_context(sim, hub, tmp_path):
    long, short = (HfApi(endpoint=hub.endpoint).model_info(r, files_metadata=True) for r in (TINY_LONG, TINY_TEXT))
    blobs = {
        r: {s.rfilename: s.lfs.sha256 if s.lfs else s.blob_id for s in i.siblings}
        for r, i in ((TINY_LONG, long), (TINY_TEXT, short))
    }
    for name in ("model.safetensors", "tokenizer.json", "generation_config.json"):
        assert blobs[TINY_LONG][name] == blobs[TINY_TEXT][name], name
    assert blobs[TINY_LONG]["config.json"] != blobs[TINY_TEXT]["config.json"]
    # The tokenizer says the same length (vLLM caps the context at its model_max_length), and nothing else changes.
    tokenizer, base_tokenizer = (_json(hub, r, "tokenizer_config.json", tmp_path, False) for r in (TINY_LONG, TINY_TEXT))
    assert tokenizer == {**base_tokenizer, "model_max_length": LONG_CONTEXT} and base_tokenizer["model_max_length"] == 2048
    config = _json(hub, TINY_LONG, "config.json", tmp_path, False)
    assert config["max_position_embeddings"] == LONG_CONTEXT == 8_388_608
    base = _json(hub, TINY_TEXT, "config.json", tmp_path, False)
    assert {k: v for k, v in config.items() if k != "max_position_embeddings"} == {
        k: v for k, v in base.items() if k != "max_position_embeddings"
    }
    assert long.safetensors.total == short.safetensors.total
    assert KNOWN_REPLIES[TINY_LONG] == KNOWN_REPLIES[TINY_TEXT]


# --- --hub-extra --------------------------------------------------------------------------------

EXTRA = """
models:
  - id: acme/rehearsal-8b
    gated: manual
    readers: [hf_acme_reader]
    pipeline_tag: text-generation
    tags: [rehearsal]
    files:
      config.json: {json: {architectures: [LlamaForCausalLM], num_hidden_layers: 32, max_position_embeddings: 8192}}
      tokenizer_config.json: {json: {chat_template: "{{ messages }}"}}
      model-00001-of-00002.safetensors: 4976698672
      model-00002-of-00002.safetensors: 1000
  - id: acme/private-1b
    private: true
    readers: [hf_acme_owner]
    files:
      config.json: {json: {architectures: [LlamaForCausalLM], num_hidden_layers: 16}}
      model.safetensors: 2000000000
"""
REPLACE_MISTRAL = """
models:
  - id: mistralai/Mistral-7B-Instruct-v0.3
    files:
      config.json: {json: {architectures: [MistralForCausalLM], max_position_embeddings: 1024}}
      model.safetensors: 2000
  - id: acme/second
    gated: auto
    files: {config.json: {json: {}}, chat_template.jinja: {text: "{{ messages }}"}}
"""


def _run_sim(*args: str, state: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gpu_session.sim", "--state-dir", str(state), *args],
                          capture_output=True, text=True, timeout=60)  # fmt: skip


def test_hub_extra_at_start_and_into_a_running_simulator(tmp_path, monkeypatch):
    state = tmp_path / "sim"
    (tmp_path / "extra.yaml").write_text(EXTRA)
    (tmp_path / "replace.yaml").write_text(REPLACE_MISTRAL)
    (tmp_path / "bad.yaml").write_text("models:\n  - id: acme/bad\n    gated: yes-please\n    files: {config.json: 1}\n")
    proc = subprocess.Popen(
        [sys.executable, "-m", "gpu_session.sim", "--state-dir", str(state), "--loopback", "--hub-extra", str(tmp_path / "extra.yaml")],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        env = {}
        while "HF_TOKEN" not in env:
            line = proc.stdout.readline()
            assert line.startswith("export "), line + proc.stderr.read()
            k, _, v = line[len("export ") :].strip().partition("=")
            env[k] = v
        endpoint = json.loads((state / "sim.json").read_text())["env"]["HF_ENDPOINT"]
        api = HfApi(endpoint=endpoint, token=False)
        info = api.model_info("acme/rehearsal-8b", files_metadata=True)
        assert (info.gated, info.tags[-1]) == ("manual", "rehearsal")
        assert {s.rfilename: s.size for s in info.siblings}["model-00001-of-00002.safetensors"] == 4_976_698_672
        url = hf_hub_url("acme/rehearsal-8b", "model-00002-of-00002.safetensors", endpoint=endpoint)
        assert get_hf_file_metadata(url, token="hf_acme_reader").size == 1000  # readers become valid tokens
        with pytest.raises(GatedRepoError):
            get_hf_file_metadata(url, token=env["HF_TOKEN"])
        assert api.model_info(MISTRAL).safetensors.total == 7_248_023_552  # the built-in, until replaced

        # A private repo is missing to anyone but its owner's tokens, as on the Hub; sizing reads its
        # privacy, which keeps its weights off a cache volume.
        for token in (False, env["HF_TOKEN"]):
            with pytest.raises(RepositoryNotFoundError):
                api.model_info("acme/private-1b", token=token)
        assert api.model_info("acme/private-1b", token="hf_acme_owner").private is True
        assert "acme/private-1b" not in {m.id for m in api.list_models(search="acme")}
        with pytest.raises(RepositoryNotFoundError):
            get_hf_file_metadata(hf_hub_url("acme/private-1b", "config.json", endpoint=endpoint), token=False)
        monkeypatch.setenv("HF_ENDPOINT", endpoint)
        private = sizing.model_info("acme/private-1b", token="hf_acme_owner")
        assert private.private and not private.may_cache(cache_gated=False)
        with pytest.raises(sizing.SizingError, match="is private and the HF token cannot see it"):
            sizing.model_info("acme/private-1b", token=env["HF_TOKEN"])
        assert not sizing.model_info("acme/rehearsal-8b", token="hf_acme_reader").private

        bad = _run_sim("--hub-extra", str(tmp_path / "replace.yaml"), "--hub-extra", str(tmp_path / "bad.yaml"), state=state)
        assert bad.returncode != 0 and "models[0] (acme/bad): gated must be false, auto or manual" in bad.stderr
        assert api.model_info(MISTRAL).safetensors.total == 7_248_023_552  # nothing of either file was taken

        added = _run_sim("--hub-extra", str(tmp_path / "replace.yaml"), state=state)
        assert added.returncode == 0, added.stderr
        assert {s.rfilename for s in api.model_info(MISTRAL).siblings} == {"config.json", "model.safetensors"}
        assert api.model_info("acme/second").gated == "auto"
        assert "acme/rehearsal-8b" in {m.id for m in api.list_models(search="acme")}
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0


@pytest.mark.parametrize(
    "text, error",
    [
        ("models: [{id: a/b, files: {x: 1}", "not valid YAML at line"),
        ("model: []", "expected a top-level `models:` list"),
        ("models: [{gated: false, files: {x: 1}}]", "models[0]: missing id"),
        ("models: [{id: no-owner, files: {x: 1}}]", "models[0]: id 'no-owner' is not a Hub id"),
        ("models: [{id: a--b/c, files: {x: 1}}]", "is not a Hub id"),
        (
            "models: [{id: a/b, files: {x: 1}}, {id: a/c, gated: true, files: {x: 1}}]",
            "models[1] (a/c): gated must be false, auto or manual, not True",
        ),
        (
            "models: [{id: a/b, files: {config.json: {yaml: 1}}}]",
            "models[0] (a/b): files: config.json: {'yaml': 1} is neither a size in bytes",
        ),
        ("models: [{id: a/b, files: {w.bin: -1}}]", "files: w.bin: -1 is neither a size in bytes"),
        ("models: [{id: a/b, files: {w.bin: 12.5}}]", "files: w.bin: 12.5 is neither"),
        (
            "models: [{id: a/b, readers: [hf_x], files: {x: 1}}]",
            "models[0] (a/b): readers apply to gated or private entries only",
        ),
        ("models: [{id: a/b, private: maybe, files: {x: 1}}]", "models[0] (a/b): private must be true or false"),
        ("models: [{id: a/b, gated: manual, readers: hf_x, files: {x: 1}}]", "readers must be a list of tokens"),
        ("models: [{id: a/b, reader: [hf_x], files: {x: 1}}]", "unknown field 'reader'"),
        ("models: [{id: a/b}]", "files must map every file"),
    ],
)
def test_bad_hub_extra_files_say_which_entry_and_field(text, error):
    with pytest.raises(hub_models.BadHubEntry) as e:
        hub_models.parse(text, "my.yaml")
    assert str(e.value).startswith("my.yaml: ") and error in str(e.value) and "\n" not in str(e.value)


def test_bad_hub_extra_stops_the_cli_before_it_starts(tmp_path):
    (tmp_path / "bad.yaml").write_text("models: [{id: a/b, files: {w.safetensors: big}}]")
    out = _run_sim("--hub-extra", str(tmp_path / "bad.yaml"), state=tmp_path / "sim")
    assert out.returncode != 0 and "bad --hub-extra:" in out.stderr and "w.safetensors" in out.stderr
    assert not (tmp_path / "sim" / "sim.json").exists()
    missing = _run_sim("--hub-extra", str(tmp_path / "nothing.yaml"), state=tmp_path / "sim")
    assert missing.returncode != 0 and "cannot read" in missing.stderr
