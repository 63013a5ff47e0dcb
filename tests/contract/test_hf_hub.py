"""The unmodified huggingface_hub client (and the `hf` CLI) against the simulated Hub."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
from pathlib import Path

import jinja2
import pytest
import requests
from huggingface_hub import HfApi, snapshot_download
from huggingface_hub.errors import (
    EntryNotFoundError,
    GatedRepoError,
    HfHubHTTPError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from tokenizers import Tokenizer

TINY = "gpu-session/tiny-chat"


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
