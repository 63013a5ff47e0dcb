"""A base for the session: its user, one private data root, an environment that keeps every cache
inside it, no shell history, and uv."""

import os

import testinfra.utils.ansible_runner

testinfra_hosts = testinfra.utils.ansible_runner.AnsibleRunner(os.environ["MOLECULE_INVENTORY_FILE"]).get_hosts("all")
CACHES = [
    "HF_HOME",
    "HF_XET_CACHE",
    "VLLM_CACHE_ROOT",
    "TRITON_CACHE_DIR",
    "TORCHINDUCTOR_CACHE_DIR",
    "XDG_CACHE_HOME",
    "TMPDIR",
    "UV_CACHE_DIR",
    "PIP_CACHE_DIR",
]


def test_service_user_owns_a_private_data_root(host):
    user = host.user("gpu-session")
    assert user.exists and user.shell == "/usr/sbin/nologin" and user.home == "/opt/gpu-session"
    with host.sudo():
        for path, mode in [("/opt/gpu-session", 0o750), ("/opt/gpu-session/tmp", 0o700), ("/dev/shm/gpu-session", 0o700)]:
            d = host.file(path)
            assert d.is_directory and (d.user, d.mode) == ("gpu-session", mode), path


def test_environment_keeps_caches_inside_and_telemetry_off(host):
    with host.sudo():
        f = host.file("/opt/gpu-session/env")
        assert (f.user, f.mode) == ("gpu-session", 0o600)
        env = dict(line.split("=", 1) for line in f.content_string.splitlines() if "=" in line and not line.startswith("#"))
    assert all(env[name].startswith("/opt/gpu-session/") for name in CACHES)
    assert env["HF_HUB_DISABLE_TELEMETRY"] == env["VLLM_NO_USAGE_STATS"] == env["DO_NOT_TRACK"] == "1"
    assert env["HF_ENDPOINT"] == os.environ["HF_ENDPOINT"]


def test_login_shells_keep_no_history(host):
    assert host.check_output("bash -lc 'echo ${HISTFILE:-none} $HISTSIZE'") == "none 0"


def test_uv_is_installed(host):
    assert host.check_output("/usr/local/bin/uv --version").startswith("uv ")
