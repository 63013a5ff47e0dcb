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


def test_a_private_data_root_that_the_service_user_writes_only_where_it_must(host):
    """The data root, `run` and the pid folder are root's (root runs and reads what is in them); the
    service user owns the folders its processes write, and its home is one of them."""
    user = host.user("gpu-session")
    assert user.exists and user.shell == "/usr/sbin/nologin" and user.home == "/opt/gpu-session/home"
    with host.sudo():
        for path, owner, mode in [
            ("/opt/gpu-session", "root", 0o750),
            ("/opt/gpu-session/run", "root", 0o750),
            ("/run/gpu-session", "root", 0o750),
            ("/opt/gpu-session/tmp", "gpu-session", 0o700),
            ("/opt/gpu-session/home", "gpu-session", 0o700),
            ("/opt/gpu-session/hf", "gpu-session", 0o750),
            ("/dev/shm/gpu-session", "gpu-session", 0o700),
        ]:
            d = host.file(path)
            assert d.is_directory and (d.user, d.group, d.mode) == (owner, "gpu-session", mode), path


def test_environment_keeps_caches_inside_and_telemetry_off(host):
    with host.sudo():
        f = host.file("/opt/gpu-session/env")
        assert (f.user, f.group, f.mode) == ("root", "gpu-session", 0o640)
        env = dict(line.split("=", 1) for line in f.content_string.splitlines() if "=" in line and not line.startswith("#"))
    assert all(env[name].startswith("/opt/gpu-session/") for name in CACHES)
    assert env["HF_HUB_DISABLE_TELEMETRY"] == env["VLLM_NO_USAGE_STATS"] == env["DO_NOT_TRACK"] == "1"
    assert env["HF_ENDPOINT"] == os.environ["HF_ENDPOINT"]


def test_login_shells_keep_no_history(host):
    assert host.check_output("bash -lc 'echo ${HISTFILE:-none} $HISTSIZE'") == "none 0"


def test_uv_is_installed(host):
    assert host.check_output("/usr/local/bin/uv --version").startswith("uv ")
