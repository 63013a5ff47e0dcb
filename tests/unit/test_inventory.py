"""The inventory configure.py renders: values stay values, whatever they contain."""

from pathlib import Path

import yaml

from gpu_session.host.ansible import Target, _inventory, inventory_yaml


def test_renders_a_pinned_ssh_inventory_with_the_shared_variables():
    t = Target("10.0.0.1", 2222, "root", Path("/keys/id"), Path("/state/my stack/known_hosts"))
    host = _inventory(t)["all"]["hosts"]["gpu"]
    assert (host["ansible_host"], host["ansible_port"], host["ansible_user"]) == ("10.0.0.1", 2222, "root")
    assert host["ansible_ssh_common_args"].startswith(
        "-o UserKnownHostsFile='/state/my stack/known_hosts' -o StrictHostKeyChecking=yes"
    )
    assert _inventory(t)["all"]["vars"]["gpu_session_data_root"] == "/opt/gpu-session"


def test_hostile_values_cannot_add_keys():
    t = Target("h\nansible_connection: local", 22, "u: x", Path("/k"), Path("/kh"))
    host = yaml.safe_load(inventory_yaml(t))["all"]["hosts"]["gpu"]
    assert host["ansible_host"] == "h\nansible_connection: local" and "ansible_connection" not in host
    assert host["ansible_user"] == "u: x"
