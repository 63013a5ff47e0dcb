"""Which plan takes a cache volume: one in the plan's region, before the same offer elsewhere; a
RunPod plan (any data center) tries the cache's data center first and keeps its own after; a
cache where no fitting offer is goes unused, and the first plan says so."""

from __future__ import annotations

from dataclasses import replace
from types import SimpleNamespace

import pytest

from gpu_session import fit
from gpu_session.clouds import API_BASE_ENVS, Offer, Volume
from gpu_session.session import cache, plan
from gpu_session.session.plan import Plan, with_caches


def offer(cloud: str, name: str, price: float, regions: tuple[str, ...]) -> Offer:
    return Offer(cloud, name, name, 1, 24, price, regions)


def a_cache(cloud: str, region: str, volume: bool = True, endpoint: str = "", size_gb: int | None = None):
    """A cache as cache.caches() gives it: a RunPod volume's size is 50 GB unless said, a Lambda filesystem has no cap."""
    size_gb = size_gb or (50 if cloud == "runpod" else None)
    vol = Volume(f"v-{region}", f"gpu-session-cache-{region}", cloud, region, size_gb, 0, False, "/mnt") if volume else None
    return SimpleNamespace(cloud=cloud, region=region, volume=vol, monthly_usd=3.5, stack=f"{cloud}-{region}", endpoint=endpoint,
                           cloud_sized=cloud == "runpod", price_per_gb_month=0.2, size_gb=size_gb)  # fmt: skip


@pytest.fixture
def caches(monkeypatch):
    """The caches with_caches finds, in a shell pointed at the real APIs (a test before may have left a
    simulator's address in the environment: RunpodCloud sets the SDK's)."""
    for name in (name for names in API_BASE_ENVS.values() for name in names):
        monkeypatch.delenv(name, raising=False)
    found: list = []
    monkeypatch.setattr(cache, "caches", lambda: found)
    return found


A10 = offer("lambda", "A10", 0.75, ("us-west-1", "us-east-1"))
A100 = offer("lambda", "A100", 1.29, ("us-east-1",))
RTX = offer("runpod", "RTX 4090", 0.69, ("any",))


def plans(*offers: Offer) -> list[Plan]:
    return [Plan(o, r, 10.0, 1.0) for o in offers for r in o.launch_regions()]


def test_without_caches_the_plans_stay_as_they_are(caches):
    assert with_caches(plans(A10, A100), ["lambda"]) == plans(A10, A100)


def test_a_cache_in_a_region_of_the_cheapest_offer_comes_first(caches):
    caches.append(a_cache("lambda", "us-east-1"))
    got = with_caches(plans(A10, A100), ["lambda"])
    assert [(p.offer.gpu_name, p.region, bool(p.cache)) for p in got] == [
        ("A10", "us-east-1", True),
        ("A10", "us-west-1", False),
        ("A100", "us-east-1", True),
    ]
    assert "cache lambda us-east-1" in got[0].cache_line() and got[0].summary("m")["cache"]["volume_id"] == "v-us-east-1"
    assert "cache" not in got[0].describe()  # the plan's line stays one line; the cache's is its own


def test_a_cache_where_no_fitting_offer_is_goes_unused_and_the_plan_says_so(caches):
    caches.append(a_cache("lambda", "europe-central-1"))
    got = with_caches(plans(A10), ["lambda"])
    assert [p.cache for p in got] == [None, None]
    assert got[0].cache_line() == "no cache: the lambda one(s) in europe-central-1 are not where A10 is offered"


def test_a_cache_on_another_cloud_than_the_cheapest_fit_is_named_as_such(caches):
    caches += [a_cache("lambda", "us-east-1"), a_cache("runpod", "EU-RO-1", endpoint="")]
    got = with_caches(plans(RTX, A10), ["runpod", "lambda"])
    assert [(p.offer.gpu_name, p.region, bool(p.cache)) for p in got][:2] == [
        ("RTX 4090", "EU-RO-1", True),
        ("RTX 4090", None, False),
    ]
    caches.pop()  # only the Lambda cache: the cheapest fit is on RunPod
    got = with_caches(plans(RTX, A10), ["runpod", "lambda"])
    assert got[0].cache is None and got[0].cache_line() == (
        "no cache: lambda us-east-1 is on another cloud than this plan's (`--cloud lambda` plans there)"
    )
    assert [(p.offer.gpu_name, p.region) for p in got if p.cache] == [("A10", "us-east-1")]  # still planned, after
    only_runpod = with_caches(plans(RTX), ["runpod", "lambda"])  # no Lambda offer fits: --cloud lambda would fail
    assert only_runpod[0].cache_line() == "no cache: lambda us-east-1 is on another cloud than this plan's, where no offer fits"


def test_a_runpod_plan_tries_the_cache_data_center_first_and_keeps_its_own(caches):
    caches.append(a_cache("runpod", "EU-RO-1"))
    got = with_caches(plans(RTX), ["runpod"])
    assert [(p.region, bool(p.cache)) for p in got] == [("EU-RO-1", True), (None, False)]


def test_caches_of_other_clouds_or_gone_at_the_cloud_are_left_out(caches):
    caches += [a_cache("runpod", "EU-RO-1"), a_cache("lambda", "us-east-1", volume=False)]
    assert with_caches(plans(A10), ["lambda"]) == plans(A10)


def test_the_stack_config_names_the_volume_only_with_a_cache(caches):
    caches.append(a_cache("lambda", "us-east-1"))
    first, second = with_caches(plans(A10), ["lambda"])[:2]
    opts = plan.UpOptions("o/m", cache_gated=True)
    assert plan.stack_settings(opts, first)["cacheVolume"] == "v-us-east-1"
    assert plan.stack_settings(opts, first)["cacheGated"] == "true"
    assert "cacheVolume" not in plan.stack_settings(opts, second)


def test_only_caches_at_the_api_this_shell_points_at_are_offered(caches, monkeypatch):
    """A cache made at the real API is never offered to a simulated up, nor the simulator's to a real one."""
    monkeypatch.delenv("LAMBDA_API_BASE", raising=False)
    caches += [a_cache("lambda", "us-east-1", endpoint="http://127.0.0.1:8080/api/v1")]
    assert with_caches(plans(A10), ["lambda"]) == plans(A10)
    caches[:] = [a_cache("lambda", "us-east-1")]
    monkeypatch.setenv("LAMBDA_API_BASE", "http://127.0.0.1:8080/api/v1")
    assert with_caches(plans(A10), ["lambda"]) == plans(A10)
    caches[:] = [a_cache("lambda", "us-east-1", endpoint="http://127.0.0.1:9090/api/v1")]  # a simulator on another port
    assert with_caches(plans(A10), ["lambda"])[0].cache is caches[0]


def test_only_public_weights_go_on_a_cache_unless_the_user_said_so():
    """A gated or private repo's weights would outlive the session and its token on the volume."""
    from gpu_session.sizing import ModelInfo

    def info(**kind) -> ModelInfo:
        return ModelInfo("o/m", {"model.safetensors": 1}, vision=False, **{"gated": False, **kind})

    assert info().may_cache(cache_gated=False)
    assert not info(gated=True).may_cache(cache_gated=False) and info(gated=True).may_cache(cache_gated=True)
    assert not info(private=True).may_cache(cache_gated=False) and info(private=True).may_cache(cache_gated=True)


def test_the_plan_says_a_gated_or_private_models_weights_stay_off_the_cache(caches):
    caches.append(a_cache("lambda", "us-east-1"))
    public, private = (replace(with_caches(plans(A10), ["lambda"])[0], cache_weights=w) for w in (True, False))
    assert "the engine and the weights (under 0.1 GiB) are kept on it" in public.cache_line()
    assert "the engine is kept on it" in private.cache_line() and "--cache-gated keeps them" in private.cache_line()
    assert "the engine and the 15.0 GiB of weights" in replace(public, weights_gb=15.0).cache_line()


def test_the_plan_prices_a_cache_as_its_cloud_bills_it(caches):
    """RunPod bills a volume's size whether used or not; Lambda bills what a filesystem holds, so a
    new one's $0.00/month must not read as free."""
    caches[:] = [a_cache("lambda", "us-east-1"), a_cache("runpod", "US-KS-2")]
    plan = with_caches(plans(A10), ["lambda"])[0]
    lambda_line = replace(plan, weights_gb=15.0).cache_line()
    # and what it may hold after this session: the engine (10 GiB) and 15 GiB of weights, 26.8 GB at $0.20
    assert (
        "(it bills what it holds, $0.20/GB-month: $3.50/month now, up to $8.87 if this session's engine (about 10 GiB)"
        " and weights are not on it yet)"
    ) in lambda_line, lambda_line
    runpod = SimpleNamespace(**{**vars(caches[1])})
    line = replace(with_caches(plans(A10), ["lambda"])[0], cache=runpod).cache_line()
    assert "(it costs $3.50/month whether used or not)" in line, line


def test_a_cache_too_small_for_the_engine_and_the_model_keeps_the_engine_and_the_plan_says_what_would_keep_both(caches):
    """Its size known before launch: a cache that can never hold this session's engine and model
    keeps the engine alone (the weights download to the host, as without a cache; the stack says so
    to the host), and the plan says the size that would keep both, and that making it loses what the
    old one holds. A gated model's plan says the same, not that --cache-gated would keep them."""
    weights = replace(plans(RTX)[0], weights_gb=14.9, download_bytes=16_000_000_000)  # an 8B model's 16 GB
    caches.append(a_cache("runpod", "EU-RO-1", size_gb=26))  # < 10 GiB of engine (10.7 GB) + 16 GB
    [used, own] = with_caches([weights], ["runpod"])
    assert (used.cache, used.weights_cached, own.cache) == (caches[0], False, None)
    assert used.cache_line() == (
        "cache runpod EU-RO-1: the engine is kept on it, and taken from it where an earlier session left it (it costs "
        "$3.50/month whether used or not); the 14.9 GiB of weights are not: its 26 GB cannot hold them beside the engine "
        "(26.7 GB together), so the host downloads them as without a cache; to keep both, one of 40 GB would (`invoke "
        "cache.rm --cloud runpod --region EU-RO-1`, then `invoke cache.create --cloud runpod --region EU-RO-1 --size "
        "40`: what this one holds goes)"
    ), used.cache_line()
    assert used.summary("o/m")["cache"]["weights"] is False and "cannot hold" in used.summary("o/m")["cache"]["weights_note"]
    opts = plan.UpOptions("o/m", cache_gated=True)
    assert plan.stack_settings(opts, used)["cacheWeights"] == "false"
    [gated, _] = with_caches([replace(weights, cache_weights=False)], ["runpod"])
    assert gated.cache is caches[0] and "cannot hold them beside the engine" in gated.cache_line()
    assert "--cache-gated" not in gated.cache_line()  # it would not keep them either
    caches.append(a_cache("runpod", "US-KS-2", size_gb=38))  # one that holds both: before it, and no word of the other
    got = with_caches([weights], ["runpod"])
    assert [(p.region, p.weights_cached, bool(p.cache)) for p in got] == [
        ("US-KS-2", True, True), ("EU-RO-1", False, True), (None, False, False)]  # fmt: skip
    assert "too small" not in got[0].cache_line() and "stops" not in got[0].cache_line()
    assert plan.stack_settings(opts, got[0])["cacheWeights"] == "true"
    # A gated model (no --cache-gated) on a cache that has room: the stack keeps cacheWeights true,
    # so `pulumi config set gpu-session:cacheGated true` alone lets them on.
    [room, *_] = with_caches([replace(weights, cache_weights=False)], ["runpod"])
    assert room.region == "US-KS-2" and not room.weights_cached and plan.stack_settings(opts, room)["cacheWeights"] == "true"
    assert room.weights_off() == "this model is gated or private: --cache-gated keeps them"


def test_a_cache_too_small_to_build_an_engine_on_goes_unused_and_the_plan_says_what_would_do(caches):
    """RunPod enforces a volume's size and the host stops before an install it has no room for (21.5
    GB): an adopted volume under that (RunPod sells them from 10 GB; `cache create` makes none) is
    of no use, named, each with the size that would do."""
    weights = replace(plans(RTX)[0], weights_gb=14.9, download_bytes=16_000_000_000)
    caches[:] = [a_cache("runpod", "CA-MTL-1", size_gb=15), a_cache("runpod", "EU-RO-1", size_gb=10)]
    got = with_caches([weights], ["runpod"])
    assert [p.cache for p in got] == [None]
    assert got[0].cache_line() == (
        "no cache: too small for an engine: runpod CA-MTL-1 (15 GB), runpod EU-RO-1 (10 GB), where an engine takes 10.7 GB "
        "(and 21.5 GB free to install it); to keep it and this model: one of 40 GB would (`invoke cache.rm --cloud "
        "runpod --region CA-MTL-1`, then `invoke cache.create --cloud runpod --region CA-MTL-1 --size 40`: what this one "
        "holds goes); one of 40 GB would (`invoke cache.rm --cloud runpod --region EU-RO-1`, then `invoke cache.create "
        "--cloud runpod --region EU-RO-1 --size 40`: what this one holds goes)"
    ), got[0].cache_line()


def test_a_cache_that_holds_the_model_but_not_an_engines_install_is_used_with_a_warning(caches):
    """A warm cache (an earlier session built the engine) serves; only an empty one would stop the
    host before its download: the plan cannot tell which (RunPod does not report a volume's use)."""
    weights = replace(plans(RTX)[0], weights_gb=14.9, download_bytes=16_000_000_000)
    caches.append(a_cache("runpod", "EU-RO-1", size_gb=30))  # 26.7 GB kept <= 30 GB < 37.5 GB to install
    [used, own] = with_caches([weights], ["runpod"])
    assert used.cache is caches[0] and own.cache is None
    assert used.cache_line().endswith(
        "; 30 GB hold this model and its engine (about 27 GB) but not the room to install the engine (37.5 GB): "
        "if no earlier session left the engine on it, the host stops before it downloads"
    ), used.cache_line()


def test_a_lambda_cache_under_its_soft_cap_keeps_the_engine_the_plan_says_raise_it(caches):
    caches += [a_cache("lambda", "us-east-1", size_gb=22), a_cache("lambda", "us-west-1", size_gb=None)]
    big = [replace(p, weights_gb=12.0, download_bytes=12 * fit.GIB) for p in plans(A10)]
    got = with_caches(big, ["lambda"])
    # no cap: both, first; under the cap: the engine alone
    assert [(p.region, bool(p.cache), p.weights_cached) for p in got] == [("us-west-1", True, True), ("us-east-1", True, False)]
    caches.pop()
    got = with_caches(big, ["lambda"])
    assert [(p.region, bool(p.cache), p.weights_cached) for p in got] == [("us-east-1", True, False), ("us-west-1", False, False)]
    assert (
        got[0]
        .cache_line()
        .endswith(
            "its soft cap of 22 GB cannot hold them beside the engine (23.6 GB together), so the host downloads them as without "
            "a cache; to keep both, `invoke cache.create --cloud lambda --region us-east-1 --size 40` raises its soft cap"
        )
    ), got[0].cache_line()
    assert "up to $5.65 if this session's engine (about 10 GiB) is not on it yet" in got[0].cache_line()  # the weights are not
    small = [replace(p, weights_gb=2.0, download_bytes=2 * fit.GIB) for p in plans(A10)]  # 12.9 GB: under the cap
    assert with_caches(small, ["lambda"])[0].cache is caches[0] and "stops" not in with_caches(small, ["lambda"])[0].cache_line()


def test_the_hf_token_goes_in_the_stack_only_for_a_gated_or_private_model(caches, monkeypatch):
    """A rented host never holds a token it does not need: the stack (whose Configure hands it to
    the host) gets HF_TOKEN only where the Hub needs it for the model's files."""
    from gpu_session.sizing import ModelInfo

    monkeypatch.setenv("HF_TOKEN", "hf_user_token")
    monkeypatch.setattr(plan, "clouds_for", lambda cloud: ["lambda"])
    monkeypatch.setattr(plan, "cloud_client", lambda cloud: SimpleNamespace(offers=lambda: [A10]))
    opts = plan.UpOptions("o/m", cloud="lambda", backend="transformers")
    config = {"architectures": ["LlamaForCausalLM"], "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 1,
              "num_key_value_heads": 1, "max_position_embeddings": 2048, "torch_dtype": "bfloat16"}  # fmt: skip
    for kind, needs in (({}, False), ({"gated": True}, True), ({"private": True}, True)):
        info = ModelInfo("o/m", {"model.safetensors": 1_000_000}, vision=False, config=config, **{"gated": False, **kind})
        first = plan.plans(opts, info)[0]
        assert first.needs_token is needs
        assert plan.stack_settings(opts, first).get("hfToken") == ("hf_user_token" if needs else None), kind
    monkeypatch.delenv("HF_TOKEN")
    assert "hfToken" not in plan.stack_settings(opts, first)  # gated, but no token here: none in the stack


def test_no_cache_says_which_caches_it_leaves_unused(tmp_path, monkeypatch):
    """`up --no-cache` with caches here: the plan names those of its clouds at this shell's API,
    read from the cache stacks' files (a simulator's cache is not the real cloud's, and back)."""
    import json

    from gpu_session.stack import names
    from gpu_session.stack.automation import workspaces

    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    for name in (name for names_ in API_BASE_ENVS.values() for name in names_):
        monkeypatch.delenv(name, raising=False)
    assert plan.without_caches(plans(A10), ["lambda"]) == plans(A10)  # none here: nothing said
    for cloud, region, endpoint in (
        ("lambda", "us-east-1", ""),
        ("runpod", "EU-RO-1", ""),
        ("lambda", "us-west-1", "http://sim"),
    ):
        stack = names.cache_stack(cloud, region)
        folder = workspaces(names.CACHE_PROJECT) / stack
        folder.mkdir(parents=True)
        (folder / f"Pulumi.{stack}.yaml").write_text(f"config:\n  gpu-session:cloud: {cloud}\n  gpu-session:region: {region}\n")
        recorded = {"LAMBDA_API_BASE": endpoint} if endpoint else {}
        (folder / cache.ENVIRONMENT_FILE).write_text(json.dumps(recorded))
    [first] = plan.without_caches(plans(A10)[:1], ["lambda"])
    assert first.cache is None and first.cache_line() == "no cache: --no-cache leaves lambda us-east-1 unused"
    [first] = plan.without_caches(plans(A10)[:1], ["lambda", "runpod"])
    assert first.cache_line() == "no cache: --no-cache leaves lambda us-east-1, runpod EU-RO-1 unused"
    monkeypatch.setenv("LAMBDA_API_BASE", "http://sim")  # a shell pointed at the simulator
    [first] = plan.without_caches(plans(A10)[:1], ["lambda"])
    assert first.cache_line() == "no cache: --no-cache leaves lambda us-west-1 unused"
