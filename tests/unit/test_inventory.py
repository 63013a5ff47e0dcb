"""The inventory configure.py renders: values stay values, whatever they contain."""

from pathlib import Path

import pytest
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


def test_a_mitogen_strategy_without_mitogen_is_refused_saying_what_to_install(monkeypatch):
    """ANSIBLE_STRATEGY=mitogen_linear chooses Mitogen's strategy (README: Faster configure with
    Mitogen); without the package, up refuses before anything starts, saying what to install."""
    from gpu_session.host import ansible

    assert ansible.strategy_plugins() and Path(ansible.strategy_plugins(), "mitogen_linear.py").is_file()  # CI installs it
    ansible.check_strategy({"ANSIBLE_STRATEGY": "mitogen_linear"})
    monkeypatch.setattr(ansible, "strategy_plugins", lambda: None)
    with pytest.raises(ansible.MitogenMissing, match=r"pip install 'gpu-session\[mitogen\]', or unset ANSIBLE_STRATEGY"):
        ansible.check_strategy({"ANSIBLE_STRATEGY": "mitogen_linear"})
    ansible.check_strategy({"ANSIBLE_STRATEGY": "free"})  # Ansible's own strategies need nothing
    ansible.check_strategy({})
