"""Which offers fit a model, and why none does; host-key pins."""

from __future__ import annotations

import math

from gpu_session import fit
from gpu_session.clouds import Offer
from gpu_session.host.ssh import pin, pinned
from gpu_session.sizing import ModelInfo, explain_no_fit, fitting, room_for

A10 = Offer("lambda", "A10", "gpu_1x_a10", 1, 24, 0.75, ("us-east-1",))
A100 = Offer("lambda", "A100", "gpu_1x_a100", 1, 40, 1.29, ("us-west-1",))
H100X2 = Offer("lambda", "H100", "gpu_2x_h100", 2, 80, 6.38, ("us-east-1",))
A6000_FULL = Offer("lambda", "A6000", "gpu_1x_a6000", 1, 48, 0.80, ())
SPOT = Offer("runpod", "RTX 4090", "NVIDIA GeForce RTX 4090", 1, 24, 0.20, ("any",), spot=True)
GH200 = Offer("lambda", "GH200", "gpu_1x_gh200", 1, 96, 1.49, ("us-east-1",))
OFFERS = [H100X2, A100, A6000_FULL, A10, SPOT, GH200]
GIB = 1024**3
# Llama-3.1-8B-Instruct's config.json (the shapes that size its KV cache).
LLAMA_8B = {"architectures": ["LlamaForCausalLM"], "num_hidden_layers": 32, "num_attention_heads": 32,
            "num_key_value_heads": 8, "hidden_size": 4096, "torch_dtype": "bfloat16", "max_position_embeddings": 131072}  # fmt: skip


def llama_8b(**changes) -> ModelInfo:
    shards = {f"model-0000{i}-of-00004.safetensors": 16_060_522_496 // 4 for i in range(1, 5)}
    return ModelInfo("meta-llama/Llama-3.1-8B-Instruct", {"config.json": 900, **shards}, gated=True, vision=False,
                     config={**LLAMA_8B, **changes})  # fmt: skip


def test_an_8b_model_needs_its_weights_and_the_kv_cache_of_its_context():
    info = llama_8b()
    assert info.kv_bytes_per_token == 128 * 1024 and info.default_context() == 8192
    assert info.need_bytes() == 16_060_522_496 + math.ceil(128 * 1024 * 8192 / fit.CONTEXT_MARGIN)
    assert info.need_gb() == 16.0 and info.need_gb(131072) == 31.5
    assert info.need_bytes(quantize=True) - info.need_bytes() == int(16_060_522_496 * 0.3) - 16_060_522_496
    assert info.backend() == "vllm" and info.disk_gb() == 40


def test_an_a10_serves_the_8b_model_about_a_quarter_of_its_context():
    """The issue's example: a 24 GB card plans, and holds only part of 131,072 tokens."""
    context = llama_8b().context_on(A10)
    assert 25_000 < context < 131072 // 4 + 2048
    assert llama_8b().context_on(A10, device="cpu") <= context  # vLLM's CPU KV cache space caps it too
    assert llama_8b().context_on(H100X2) == 131072  # capped at the model's own


def test_the_cheapest_offer_with_room_and_capacity_comes_first():
    assert fitting(OFFERS, 17 * GIB) == [A10, A100, H100X2]  # no spot, no Arm, not the one without capacity
    assert fitting(OFFERS, 30 * GIB) == [A100, H100X2]
    assert fitting(OFFERS, 30 * GIB, max_price=2) == [A100]
    assert fitting(OFFERS, 10 * GIB, gpu_count=2) == [H100X2]
    assert fitting(OFFERS, 10 * GIB, gpu_type="A100") == [A100]


def test_a_model_between_the_sold_and_the_reported_memory_is_not_planned_on_that_card():
    """Lambda sells the A10 as 24 GB; nvidia-smi reports 23,028 MiB, of which vLLM takes 0.9."""
    assert A10.memory_mib == 23028 and fit.room(A10.memory_mib, 1) < 19 * GIB
    assert A10 not in fitting(OFFERS, 19 * GIB) and A100 in fitting(OFFERS, 19 * GIB)


def test_arm_machines_are_left_out_until_the_engines_install_there():
    assert GH200.arch == "aarch64" and A10.arch == "x86_64"
    assert GH200 not in fitting(OFFERS, 60 * GIB)
    why = explain_no_fit([GH200, A10], 60 * GIB, gpu_count=None, max_price=None, gpu_type=None)
    assert "GH200 would hold it, but its machines are Arm (aarch64)" in why
    only_arm = explain_no_fit(OFFERS, 10 * GIB, gpu_count=None, max_price=None, gpu_type="GH200")
    assert "GH200 machines are Arm (aarch64)" in only_arm and "choose another --gpu" in only_arm


def test_the_plan_never_says_a_fitting_room_is_smaller_than_the_need():
    """The room rounds down and the need up (neither said better than it is), with the decimals
    that keep their order: a room that holds the need never reads smaller."""
    for room_gib, need_gib in ((18.75, 18.71), (18.75, 18.749), (24.0, 18.8), (18.7, 18.75), (20.1, 20.1)):
        said = room_for(int(room_gib * GIB), int(need_gib * GIB))
        room, need = (float(w) for w in said.replace(" GiB usable for", "").replace(" GiB needed", "").split())
        assert (room >= need) == (room_gib >= need_gib), said  # a room that holds the need, said so
        assert room <= room_gib and need >= min(need_gib, room_gib) - 0.001, said  # neither better than it is
    assert room_for(int(24.04 * GIB), int(18.71 * GIB)) == "24.0 GiB usable for 18.8 GiB needed"  # one decimal where that does
    assert room_for(int(18.75 * GIB), int(18.71 * GIB)) == "18.75 GiB usable for 18.71 GiB needed"


def test_why_nothing_fits_names_the_way_out():
    assert "more than any 1-GPU offer gives; the cheapest that fits is H100 ×2 at $6.38/h: --gpus 2 (gpuCount)" in explain_no_fit(
        OFFERS, 100 * GIB, gpu_count=1, max_price=None, gpu_type=None
    )
    assert "the largest offer here gives 140.4 GiB" in explain_no_fit(
        OFFERS, 500 * GIB, gpu_count=None, max_price=None, gpu_type=None
    )
    assert (
        "H100 ×2 at $6.38/h, above the price cap of $5.00/h (--max-price, maxPricePerHour): --gpus 2 (gpuCount) with a higher --max-price"
        in explain_no_fit(OFFERS, 100 * GIB, gpu_count=1, max_price=5.0, gpu_type=None)
    )
    assert "the cheapest that fits is A6000 ×1 at $0.80/h, above the price cap of $0.70/h (--max-price" in explain_no_fit(
        OFFERS, 30 * GIB, gpu_count=None, max_price=0.7, gpu_type=None
    )
    assert "A6000 ×1 would fit but have no capacity now" in explain_no_fit(
        OFFERS, 40 * GIB, gpu_count=1, max_price=1.0, gpu_type=None
    )


def test_a_pin_replaces_the_old_pin_of_the_same_address_and_nothing_else(tmp_path):
    known = tmp_path / "known_hosts"
    pin(known, "10.0.0.1", 22, "ssh-ed25519 AAAAold comment")
    pin(known, "10.0.0.1", 2222, "ssh-ed25519 AAAAother")
    pin(known, "10.0.0.1", 22, "ssh-ed25519 AAAAnew host")
    assert pinned(known, "10.0.0.1", 22) == ["10.0.0.1 ssh-ed25519 AAAAnew"]
    assert pinned(known, "10.0.0.1", 2222) == ["[10.0.0.1]:2222 ssh-ed25519 AAAAother"]
    assert oct(known.stat().st_mode & 0o777) == "0o600"
