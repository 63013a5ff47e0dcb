"""The gpu_check role on simulator hosts of both clouds, through gpu_session.host.ansible."""

from __future__ import annotations

import pytest

from gpu_session.host.ansible import ConfigureError, Target, run


def test_facts_for_a_fitting_model(hosts):
    result = run(hosts["lambda"], role="gpu_check", extravars={"gpu_check_required_memory_gb": 16})
    f = result.facts
    assert f["gpu_check_gpus"] == [{"index": 0, "name": "NVIDIA A10 24GB", "memory_mib": 23028, "driver_version": "580.95.05"}]
    assert f["gpu_check_driver_version"] == "580.95.05"
    assert (f["gpu_check_count"], f["gpu_check_total_memory_gb"], f["gpu_check_tensor_parallel_size"]) == (1, 22.5, 1)
    assert "gpu_check_simulated" not in f  # the device is the caller's to say (model_server_device), never sniffed
    two = run(hosts["runpod"], role="gpu_check", extravars={"gpu_check_required_memory_gb": 40, "gpu_check_min_gpus": 2})
    assert (
        two.facts["gpu_check_count"],
        two.facts["gpu_check_tensor_parallel_size"],
        two.facts["gpu_check_total_memory_gb"],
    ) == (2, 2, 48.0)


def test_second_run_changes_nothing(hosts):
    assert run(hosts["lambda"], role="gpu_check").changed == 0


def test_a_model_that_cannot_fit_fails_naming_need_and_have(hosts):
    events = []
    with pytest.raises(ConfigureError) as err:
        run(hosts["lambda"], role="gpu_check", extravars={"gpu_check_required_memory_gb": 140, "gpu_check_model": "meta-llama/Llama-3.1-70B-Instruct"},
            on_event=events.append)  # fmt: skip
    text = str(err.value)
    assert "meta-llama/Llama-3.1-70B-Instruct needs 140 GB" in text and "has 22.5 GB (1 x NVIDIA A10 24GB)" in text
    assert any(e.kind == "task" and e.task == "Query the GPUs" for e in events)


def test_too_few_gpus_and_no_gpu(hosts):
    with pytest.raises(ConfigureError, match="has 1 GPU.*4 are needed"):
        run(hosts["lambda"], role="gpu_check", extravars={"gpu_check_min_gpus": 4})
    with pytest.raises(ConfigureError, match="No NVIDIA GPU answers"):
        run(hosts["runpod"], role="gpu_check", extravars={"gpu_check_nvidia_smi": "/nonexistent/nvidia-smi"})


def test_bad_arguments_are_rejected_by_the_argument_spec(hosts):
    with pytest.raises(ConfigureError, match="gpu_check_min_gpus"):
        run(hosts["lambda"], role="gpu_check", extravars={"gpu_check_min_gpus": "many"})


def test_an_unpinned_host_is_refused(hosts, tmp_path):
    t = hosts["lambda"]
    (tmp_path / "empty").write_text("")
    stranger = Target(t.host, t.port, t.user, t.private_key, tmp_path / "empty")
    with pytest.raises(ConfigureError, match="(?i)host key verification failed"):
        run(stranger, role="gpu_check")
    assert (tmp_path / "empty").read_text() == ""  # and nothing was learned on the way
