"""Which offers fit a model, and why none does; host-key pins."""

from __future__ import annotations

from gpu_session.clouds import Offer
from gpu_session.host.ssh import pin, pinned
from gpu_session.sizing import ModelInfo, explain_no_fit, fitting

A10 = Offer("lambda", "A10", "gpu_1x_a10", 1, 24, 0.75, ("us-east-1",))
A100 = Offer("lambda", "A100", "gpu_1x_a100", 1, 40, 1.29, ("us-west-1",))
H100X2 = Offer("lambda", "H100", "gpu_2x_h100", 2, 80, 6.38, ("us-east-1",))
A6000_FULL = Offer("lambda", "A6000", "gpu_1x_a6000", 1, 48, 0.80, ())
SPOT = Offer("runpod", "RTX 4090", "NVIDIA GeForce RTX 4090", 1, 24, 0.20, ("any",), spot=True)
OFFERS = [H100X2, A100, A6000_FULL, A10, SPOT]


def test_an_8b_model_needs_its_weights_and_a_fifth_more():
    info = ModelInfo("meta-llama/Llama-3.1-8B-Instruct", 16_060_522_496, gated=True, vision=False)
    assert info.need_gb() == 18.0 and info.need_gb(quantize=True) == 5.4 and info.backend == "vllm"
    assert ModelInfo("x/vl", 1, gated=False, vision=True).backend == "transformers"


def test_the_cheapest_offer_with_room_and_capacity_comes_first():
    assert fitting(OFFERS, 17.9) == [A10, A100, H100X2]  # no spot, not the one without capacity
    assert fitting(OFFERS, 30) == [A100, H100X2]
    assert fitting(OFFERS, 30, max_price=2) == [A100]
    assert fitting(OFFERS, 10, gpu_count=2) == [H100X2]
    assert fitting(OFFERS, 10, gpu_type="A100") == [A100]


def test_why_nothing_fits_names_the_way_out():
    assert "more than any 1-GPU offer has; the cheapest that fits is H100 ×2 at $6.38/h: set gpuCount 2" in explain_no_fit(
        OFFERS, 150, gpu_count=1, max_price=None, gpu_type=None
    )
    assert "the largest offer here has 160 GB" in explain_no_fit(OFFERS, 500, gpu_count=None, max_price=None, gpu_type=None)
    assert "the cheapest that fits is A6000 ×1 at $0.80/h, above maxPricePerHour $0.70" in explain_no_fit(
        OFFERS, 30, gpu_count=None, max_price=0.7, gpu_type=None
    )
    assert "A6000 ×1 would fit but have no capacity now" in explain_no_fit(OFFERS, 45, gpu_count=1, max_price=1.0, gpu_type=None)


def test_a_pin_replaces_the_old_pin_of_the_same_address_and_nothing_else(tmp_path):
    known = tmp_path / "known_hosts"
    pin(known, "10.0.0.1", 22, "ssh-ed25519 AAAAold comment")
    pin(known, "10.0.0.1", 2222, "ssh-ed25519 AAAAother")
    pin(known, "10.0.0.1", 22, "ssh-ed25519 AAAAnew host")
    assert pinned(known, "10.0.0.1", 22) == ["10.0.0.1 ssh-ed25519 AAAAnew"]
    assert pinned(known, "10.0.0.1", 2222) == ["[10.0.0.1]:2222 ssh-ed25519 AAAAother"]
    assert oct(known.stat().st_mode & 0o777) == "0o600"
