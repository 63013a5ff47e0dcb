"""`invoke up --dry-run --json` on the shapes real repos have (the simulator's Hub): the plan that
sizes the context, and each refusal that must come before anything is launched or billed.

The session's GPU rule is rehearsed as a real cloud would run it (GPU_SESSION_DEVICE=cuda): the
simulator's hosts serve on the CPU, whose KV cache space would cap every context."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
INVOKE = str(Path(sys.executable).parent / "invoke")
GIB = 1024**3


def dry_run(*args: str, device: str = "cuda", token: str | None = None, unset_token: bool = False) -> tuple[int, dict]:
    env = {**os.environ, "GPU_SESSION_DEVICE": device}
    if token:
        env["HF_TOKEN"] = token
    if unset_token:
        env.pop("HF_TOKEN", None)
    out = subprocess.run(
        [INVOKE, "up", "--dry-run", "--json", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    lines = out.stdout.strip().splitlines()
    assert len(lines) == 1, out.stdout + out.stderr[-2000:]  # one object on stdout, nothing else
    return out.returncode, json.loads(lines[0])


@pytest.fixture
def no_launch(sim, sim_env):
    """Whatever the dry runs do, the simulator launches nothing."""
    instances, events = len(sim.instances()), len(sim.world.events)
    yield
    launched = [e for e in sim.world.events[events:] if e["event"] == "launch"]
    assert len(sim.instances()) == instances and not launched, launched


def test_a_dry_run_writes_nothing_of_the_stack(no_launch):
    """Without --json too: the plan is said, and no stack folder or session log is left behind."""
    from gpu_session.local.daemon import log_path
    from gpu_session.paths import state_dir

    out = subprocess.run([INVOKE, "up", "--dry-run", "--model", "llama-8b", "--cloud", "lambda", "--stack", "only-planned"],
                         cwd=ROOT, env={**os.environ, "GPU_SESSION_DEVICE": "cuda"}, capture_output=True, text=True,
                         timeout=120)  # fmt: skip
    assert out.returncode == 0 and "plan: lambda: A10 ×1" in out.stderr and "dry run: nothing launched" in out.stderr, out.stderr
    assert not (state_dir() / "stacks" / "only-planned").exists() and not log_path("only-planned", "up").exists()


def test_the_plan_holds_the_context_and_says_what_the_offer_gives(no_launch):
    """llama-8b: 128 KiB of KV cache per token. At the default 8,192 tokens a 24 GB A10 fits, and
    it holds about a quarter of the model's 131,072; asked for all of it, a 48 GB card."""
    rc, plan = dry_run("--model", "llama-8b", "--cloud", "lambda")
    assert rc == 0 and plan["ok"] and plan["instance_type"] == "gpu_1x_a10", plan
    assert 25_000 < plan["context"] < 34_000 and plan["weights_gb"] == 15.0 and plan["backend"] == "vllm"
    assert set(plan) == {"ok", "model", "cloud", "instance_type", "gpu", "gpu_count", "region", "price_per_hour",
                         "weights_gb", "need_gb", "context", "disk_gb", "backend", "cache", "cache_note", "stack",
                         "already_up"}  # fmt: skip
    assert plan["cache"] is None and plan["cache_note"] is None  # no cache volume made here
    assert plan["already_up"] is False  # up would ask to launch it (tests/e2e/test_session: one that is up)
    rc, whole = dry_run("--model", "llama-8b", "--cloud", "lambda", "--context", "131072")
    assert rc == 0 and whole["instance_type"] == "gpu_1x_a6000" and whole["context"] == 131072 and whole["need_gb"] > 30
    rc, refused = dry_run("--model", "llama-8b", "--context", "200000")
    assert (
        rc == 1
        and refused == {"ok": False, "error": refused["error"]}
        and "served with at most 131,072 tokens" in refused["error"]
    )


def test_weights_are_counted_once(no_launch):
    """Mistral's consolidated.safetensors beside the shards; zephyr's .bin beside its .safetensors."""
    rc, mistral = dry_run("--model", "mistral-7b", "--cloud", "lambda")
    assert rc == 0 and mistral["weights_gb"] == round((4_949_453_792 + 4_999_819_336 + 4_546_807_800) / GIB, 1) == 13.5
    rc, zephyr = dry_run("--model", "HuggingFaceH4/zephyr-7b-beta", "--cloud", "lambda")
    assert rc == 0 and 13 < zephyr["weights_gb"] < 14, zephyr


@pytest.mark.parametrize(
    "args, says",
    [
        (["--model", "lmsys/vicuna-13b-v1.5"], "has no chat template"),
        (["--model", "OpenGVLab/InternVL2-8B"], "pass --trust-remote-code"),
        (["--model", "bartowski/Llama-3.2-3B-Instruct-GGUF"], "holds only GGUF files"),
        (["--model", "llama-70b", "--disk", "100"], "needs 170 GiB of disk"),
        (["--model", "llama-70b", "--gpus", "1"], "more than any 1-GPU offer gives"),
    ],
)
def test_models_no_engine_can_serve_here_are_refused_before_launch(no_launch, args, says):
    rc, refused = dry_run(*args)
    assert rc == 1 and not refused["ok"] and says in refused["error"], refused


def test_custom_code_runs_only_when_asked_and_vision_goes_to_vllm_on_a_gpu(no_launch):
    rc, plan = dry_run("--model", "OpenGVLab/InternVL2-8B", "--trust-remote-code", "--cloud", "lambda")
    assert rc == 0 and plan["backend"] == "vllm", plan
    assert dry_run("--model", "qwen-vl-7b", "--cloud", "lambda")[1]["backend"] == "vllm"
    assert dry_run("--model", "qwen-vl-7b", "--cloud", "lambda", device="cpu")[1]["backend"] == "transformers"


def test_a_gated_repo_is_checked_by_a_file_not_its_metadata(sim, no_launch):
    from gpu_session.sim.hf_hub import NON_READER_TOKEN

    model = ("--model", "google/gemma-2-9b-it", "--cloud", "lambda")
    rc, refused = dry_run(*model, token=NON_READER_TOKEN)  # the metadata answers this token; the files do not
    assert rc == 1 and "this HF token's account may not download it" in refused["error"], refused
    rc, refused = dry_run(*model, unset_token=True)
    assert rc == 1 and "is gated: accept its license" in refused["error"] and "export HF_TOKEN" in refused["error"]
    rc, plan = dry_run(*model, token="hf_sim_reader")
    assert rc == 0 and plan["ok"], plan


def test_arm_machines_are_left_out(no_launch):
    """llama-70b quantized needs about 42 GiB: the GH200 ($1.49/h, aarch64) would hold it, but our
    engines are x86_64 only, so the plan is the next card that does."""
    rc, plan = dry_run("--model", "llama-70b", "--quantize", "--cloud", "lambda")
    assert rc == 0 and plan["gpu"] != "GH200" and plan["instance_type"] == "gpu_1x_h100_pcie", plan
    assert plan["disk_gb"] == 170 and plan["weights_gb"] == 131.4  # sized from the weights: 70B is 141 GB, past the old 100


def test_a_model_between_the_sold_and_the_reported_memory_is_planned_on_a_card_that_holds_it(sim, no_launch, tmp_path):
    """19 GiB of weights and 1 GiB of context: the A10 is sold as 24 GB (the old weights × 1.2 rule
    planned it) but gives vLLM 18.7 GiB of what nvidia-smi reports. The entry comes from --hub-extra."""
    extra = tmp_path / "between.yaml"
    config = {"architectures": ["LlamaForCausalLM"], "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
              "hidden_size": 4096, "max_position_embeddings": 8192, "torch_dtype": "bfloat16"}  # fmt: skip
    extra.write_text(json.dumps({"models": [{"id": "someone/between-7b", "gated": False, "pipeline_tag": "text-generation",
                                             "files": {"config.json": {"json": config},
                                                       "tokenizer_config.json": {"json": {"chat_template": "{{ messages }}"}},
                                                       "model.safetensors": 19 * GIB}}]}))  # fmt: skip
    added = subprocess.run([sys.executable, "-m", "gpu_session.sim", "--state-dir", str(sim.state_dir), "--hub-extra", str(extra)],
                           capture_output=True, text=True, timeout=60)  # fmt: skip
    assert added.returncode == 0, added.stderr
    rc, plan = dry_run("--model", "someone/between-7b", "--cloud", "lambda")
    assert rc == 0 and plan["instance_type"] != "gpu_1x_a10" and plan["need_gb"] > 19, plan


CHECK = ROOT / "roles/model_server/files/gpu-session-model.py"


def host_check(*args: str, data_root: Path) -> subprocess.CompletedProcess:
    """The model_server role's check as the host runs it (the download tool's huggingface_hub; here ours)."""
    return subprocess.run([sys.executable, str(CHECK), "check", "--data-root", str(data_root), *args],
                          capture_output=True, text=True, timeout=120)  # fmt: skip


def test_the_host_applies_the_plans_rule_to_what_nvidia_smi_reports(sim_env, no_launch, tmp_path):
    """One rule on both sides: the context the plan gives an A10 is the context the role serves on a
    host whose nvidia-smi says 23,028 MiB, and the host downloads Mistral's shards, not its
    consolidated checkpoint."""
    rc, plan = dry_run("--model", "llama-8b", "--cloud", "lambda")
    checked = host_check("--model", "meta-llama/Llama-3.1-8B-Instruct", "--gpu-memory-mib", "23028", data_root=tmp_path)
    assert rc == 0 and checked.returncode == 0, checked.stderr
    assert json.loads(checked.stdout)["max_model_len"] == plan["context"]
    mistral = json.loads(host_check("--model", "mistralai/Mistral-7B-Instruct-v0.3", data_root=tmp_path).stdout)
    assert "consolidated.safetensors" not in mistral["files"] and "model-00003-of-00003.safetensors" in mistral["files"]
    assert mistral["weights_bytes"] == 4_949_453_792 + 4_999_819_336 + 4_546_807_800
    too_big = host_check("--model", "meta-llama/Llama-3.1-8B-Instruct", "--gpu-memory-mib", "16384", data_root=tmp_path)
    assert (
        too_big.returncode == 2 and "this host's 1 GPU(s) give" in too_big.stderr and "choose a larger GPU type" in too_big.stderr
    )


def test_the_host_refuses_a_disk_too_small_before_downloading(sim, sim_env, no_launch, tmp_path):
    extra = tmp_path / "huge.yaml"
    extra.write_text(json.dumps({"models": [{"id": "someone/huge", "gated": False, "files": {
        "config.json": {"json": {"architectures": ["LlamaForCausalLM"]}}, "model.safetensors": 1 << 50}}]}))  # fmt: skip
    added = subprocess.run([sys.executable, "-m", "gpu_session.sim", "--state-dir", str(sim.state_dir), "--hub-extra", str(extra)],
                           capture_output=True, text=True, timeout=60)  # fmt: skip
    assert added.returncode == 0, added.stderr
    refused = host_check("--model", "someone/huge", data_root=tmp_path)
    assert refused.returncode == 2 and "GiB of disk free" in refused.stderr and "(--disk)" in refused.stderr, refused.stderr
