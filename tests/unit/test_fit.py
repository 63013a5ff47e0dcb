"""The one rule (gpu_session.fit) on the shapes real repos have: which files are the weights, the
KV cache a token takes, and the context a machine holds."""

from __future__ import annotations

from gpu_session import fit

GIB = 1024**3
# mistralai/Mistral-7B-Instruct-v0.3's files: Mistral's own consolidated checkpoint beside the HF shards.
MISTRAL = {
    "consolidated.safetensors": 14_496_078_512,
    "model-00001-of-00003.safetensors": 4_949_453_792,
    "model-00002-of-00003.safetensors": 4_999_819_336,
    "model-00003-of-00003.safetensors": 4_546_807_800,
    "model.safetensors.index.json": 23_950,
    "params.json": 202,
    "tokenizer.model.v3": 587_404,
    "config.json": 601,
}
MISTRAL_INDEX = {"weight_map": {"lm_head.weight": "model-00003-of-00003.safetensors",
                                "model.embed_tokens.weight": "model-00001-of-00003.safetensors",
                                "model.layers.9.mlp.up_proj.weight": "model-00002-of-00003.safetensors"}}  # fmt: skip
SHARDS = 4_949_453_792 + 4_999_819_336 + 4_546_807_800


def test_mistral_is_counted_and_downloaded_once():
    assert fit.index_file(MISTRAL) == "model.safetensors.index.json"
    for index in (MISTRAL_INDEX, None):  # by the index, and by the layout where the index cannot be read
        weights = fit.weight_files(MISTRAL, index)
        assert sum(weights.values()) == SHARDS and "consolidated.safetensors" not in weights
    download = fit.downloads(MISTRAL, fit.weight_files(MISTRAL, MISTRAL_INDEX))
    assert "consolidated.safetensors" not in download and {"params.json", "config.json", "tokenizer.model.v3"} <= set(download)


def test_safetensors_win_over_bin_of_the_same_weights():
    files = {
        "pytorch_model-00001-of-00002.bin": 9_943_028_044, "pytorch_model-00002-of-00002.bin": 4_540_535_536,
        "pytorch_model.bin.index.json": 23_950, "model-00001-of-00002.safetensors": 9_942_981_696,
        "model-00002-of-00002.safetensors": 4_540_516_344, "model.safetensors.index.json": 23_950, "training_args.bin": 4_600,
    }  # fmt: skip
    weights = fit.weight_files(files)
    assert sorted(weights) == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    assert fit.weight_format(weights) == "safetensors" and fit.index_file(files) == "model.safetensors.index.json"
    assert not any(f.endswith(".bin") for f in fit.downloads(files, weights))


def test_bin_only_repos_count_their_shards_and_not_training_args():
    files = {"pytorch_model-00001-of-00003.bin": 9_948_728_430, "pytorch_model-00002-of-00003.bin": 9_904_165_024,
             "pytorch_model-00003-of-00003.bin": 6_178_983_625, "pytorch_model.bin.index.json": 33_444, "training_args.bin": 4_600}  # fmt: skip
    weights = fit.weight_files(files)
    assert len(weights) == 3 and fit.weight_format(weights) == "bin" and fit.index_file(files) == "pytorch_model.bin.index.json"


def test_gguf_only_and_original_checkpoints_are_no_weights():
    assert fit.weight_files({"Llama-3.2-3B-Instruct-Q4_K_M.gguf": 2_019_377_696, "README.md": 9_000}) == {}
    assert fit.weight_files({"original/consolidated.00.pth": 16_060_617_592, "config.json": 1}) == {}


def test_an_index_that_names_files_the_repo_lacks_is_not_trusted():
    files = {"model.safetensors": 2_471_645_608}
    assert fit.weight_files(files, {"weight_map": {"x": "model-00001-of-00002.safetensors"}}) == files


def test_kv_cache_per_token_for_the_kinds_of_config():
    llama_8b = {"num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8, "hidden_size": 4096}
    assert fit.kv_bytes_per_token(llama_8b) == 131_072  # 128 KiB
    assert fit.kv_bytes_per_token({**llama_8b, "num_key_value_heads": None}) == 524_288  # no GQA: every head
    assert fit.kv_bytes_per_token({**llama_8b, "torch_dtype": "float32"}) == 262_144
    gemma = {"num_hidden_layers": 42, "num_attention_heads": 16, "num_key_value_heads": 8, "hidden_size": 3584, "head_dim": 256}
    assert fit.kv_bytes_per_token(gemma) == 2 * 42 * 8 * 256 * 2  # head_dim is not hidden/heads
    qwen_vl = {"architectures": ["Qwen2_5_VLForConditionalGeneration"], "vision_config": {"depth": 32},
               "text_config": {"num_hidden_layers": 28, "num_attention_heads": 28, "num_key_value_heads": 4, "hidden_size": 3584,
                               "max_position_embeddings": 128000}}  # fmt: skip
    assert fit.kv_bytes_per_token(qwen_vl) == 2 * 28 * 4 * 128 * 2 and fit.model_context(qwen_vl) == 128000
    internvl = {"architectures": ["InternVLChatModel"], "auto_map": {"AutoConfig": "configuration_internvl_chat.InternVLChatConfig"},
                "llm_config": {"num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8, "hidden_size": 4096,
                               "max_position_embeddings": 32768}}  # fmt: skip
    assert fit.kv_bytes_per_token(internvl) == 131_072 and fit.model_context(internvl) == 32768
    deepseek = {"num_hidden_layers": 61, "num_attention_heads": 128, "kv_lora_rank": 512, "qk_rope_head_dim": 64}
    assert fit.kv_bytes_per_token(deepseek) == 61 * (512 + 64) * 2  # one latent per layer (MLA)
    assert fit.kv_bytes_per_token(
        {"num_hidden_layers": 60, "num_attention_heads": 64, "hidden_size": 8192, "num_kv_heads": 8}
    ) == (2 * 60 * 8 * 128 * 2)  # Falcon's name for the KV heads
    assert fit.kv_bytes_per_token(
        {"num_hidden_layers": 32, "num_attention_heads": 71, "hidden_size": 4544, "multi_query": True}
    ) == (2 * 32 * 1 * 64 * 2)
    assert fit.kv_bytes_per_token({}) is None


def test_the_models_own_context_is_the_smallest_length_vllm_reads():
    """vLLM serves at most the smallest of config.json's length keys and the tokenizer's
    model_max_length, and 2,048 where none says: a longer --max-model-len is refused at start."""
    assert fit.model_context({"max_position_embeddings": 131072}) == 131072
    assert fit.model_context({"max_position_embeddings": 131072}, {"model_max_length": 16384}) == 16384  # DeepSeek-R1-Distill
    assert (
        fit.model_context({"max_position_embeddings": 131072}, {"model_max_length": 1e30}) == 131072
    )  # transformers' "no limit"
    assert fit.model_context({"max_position_embeddings": 32768, "seq_length": 8192}) == 8192
    assert fit.model_context({"text_config": {"hidden_size": 3840}}) == 2048  # a Gemma-3 config leaning on class defaults
    assert fit.default_context({"max_position_embeddings": 131072}) == 8192 and fit.default_context({"n_positions": 1024}) == 1024
    assert fit.default_context({}, None, 4096) == 4096


def test_quantized_weights_keep_the_embeddings_and_the_head_at_16_bits():
    llama_8b = {"vocab_size": 128256, "hidden_size": 4096}
    full = 2 * 128256 * 4096 * 2
    assert fit.weights_in_memory(16_060_522_496, True, llama_8b) == int((16_060_522_496 - full) * fit.QUANTIZED_SHARE) + full
    assert fit.weights_in_memory(16_060_522_496, True, {**llama_8b, "tie_word_embeddings": True}) < fit.weights_in_memory(
        16_060_522_496, True, llama_8b
    )
    assert fit.weights_in_memory(16_060_522_496, False, llama_8b) == 16_060_522_496


def test_the_context_held_is_the_kv_room_capped_at_the_models_own():
    room = fit.room(23028, 1)  # an A10
    assert room == int(23028 * 1024**2 * 0.9 - 1.5 * GIB)
    held = fit.context_held(room, 15 * GIB, 131_072, 131_072)
    assert held == int((room - 15 * GIB) * fit.CONTEXT_MARGIN) // 131_072
    # A machine with just the room a context needs holds that context (the margin is in the need).
    for context in (8192, 10_000, 30_001):
        assert fit.context_held(fit.need(15 * GIB, 131_072, context), 15 * GIB, 131_072, 131_072) >= context
    assert fit.context_held(room, 1 * GIB, 1024, 2048) == 2048  # the model's own caps it
    assert fit.context_held(room, 1024, 1024, 8_388_608, kv_space=1 * GIB) < 1_048_576  # vLLM's CPU KV cache space
    assert fit.context_held(room, room + 1, 1024, 8192) == 0
    assert fit.context_held(room, 1, None, 131072) == fit.DEFAULT_CONTEXT  # unknown KV shape: what need() allowed for


def test_the_disk_holds_the_weights_and_the_engine():
    assert fit.disk_gib(141_107_412_992) == 170  # Llama-3.1-70B: 131.4 GiB of weights
    assert fit.disk_gib(1_000_000) == 30


def test_the_model_server_role_reads_the_engines_disk_need_from_this_module():
    """The role's room check before an engine's install on a cache volume takes ENGINE_DISK_GIB from
    the shipped fit.py with a regex: it must find this module's one value, a whole number."""
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    vars_text = (root / "roles/model_server/vars/main.yml").read_text()
    [pattern] = re.findall(r"regex_search\('([^']*ENGINE_DISK_GIB[^']*)'", vars_text)
    found = re.findall(pattern, Path(fit.__file__).read_text(), re.MULTILINE)
    assert found == [str(fit.ENGINE_DISK_GIB)] and type(fit.ENGINE_DISK_GIB) is int
    assert (
        "NEED_GIB: \"{{ 1 if _model_server_install_lock == 'hub' else _model_server_engine_disk_gib }}\""
        in (root / "roles/model_server/tasks/venv.yml").read_text()
    )
