"""The scrub role: plant what a session leaves (a token, an upload, a log line, history, caches, the
service user's files in /tmp and /var/tmp, a running server and watchdog), scrub, and prove it all
gone, with the receipt."""

from __future__ import annotations

import secrets

import pytest
from conftest import on

from gpu_session.host.ansible import ConfigureError, run


def plant(target, keypair) -> list[str]:
    """A configured host in use: secrets and traces in every place a session writes to."""
    run(target, role="host_base")
    token, prompt, upload, log_line = (f"canary-{what}-{secrets.token_hex(8)}" for what in ("token", "prompt", "upload", "log"))
    home = "/root" if target.user == "root" else f"/home/{target.user}"
    on(
        target,
        keypair,
        f"""sudo sh -c '
        echo HF_TOKEN={token} >> /opt/gpu-session/env
        echo {upload} > /opt/gpu-session/uploads/notes.txt
        echo "request: {log_line}" > /opt/gpu-session/logs/server.log
        mkdir -p /opt/gpu-session/hf/hub && echo {token} > /opt/gpu-session/hf/hub/token
        echo {prompt} > /dev/shm/gpu-session/kv.bin
        echo "curl -H {token}" >> /root/.bash_history
        mkdir -p /root/.cache/huggingface && echo {token} > /root/.cache/huggingface/token
        echo "{prompt}" >> {home}/.python_history
        runuser -u gpu-session -- sh -c "umask 077 && echo {upload} > /tmp/scratch && mkdir -p /var/tmp/work && echo {token} > /var/tmp/work/part"
        cd /opt/gpu-session && setsid sudo -u gpu-session python3 -m http.server 8000 --bind 127.0.0.1 >/dev/null 2>&1 < /dev/null &
        echo $! > /run/gpu-session/gpu-session-model-server.pid
        setsid sleep 3600 >/dev/null 2>&1 < /dev/null &
        echo $! > /run/gpu-session/gpu-session-lease.pid
        for i in $(seq 50); do curl -s -o /dev/null http://127.0.0.1:8000/ && break; sleep 0.1; done'""",
    )
    assert on(target, keypair, "pgrep -u gpu-session | wc -l").strip() != "0"
    return [token, prompt, upload, log_line]


@pytest.mark.parametrize("which", ["lambda", "runpod"])
def test_scrub_leaves_nothing_and_says_so(hosts, keypair, which):
    target = hosts[which]
    canaries = plant(target, keypair)
    events = []
    result = run(target, role="scrub", extravars={"scrub_canaries": canaries}, on_event=events.append)
    receipt = result.facts["scrub_receipt"]
    assert receipt["ok"] is True and receipt["verified"]["canaries_checked"] == 4
    assert {"/opt/gpu-session", "/dev/shm/gpu-session", "/run/gpu-session", "/root/.bash_history"} <= set(receipt["removed"])
    assert {"/tmp/scratch", "/var/tmp/work"} <= set(receipt["removed"])  # the service user's, outside the data root
    assert receipt["stopped_services"] == ["gpu-session-model-server", "gpu-session-lease"]
    # Checked again from outside, independently of the role's own verification.
    left = on(target, keypair, "sudo sh -c 'for c in " + " ".join(canaries) + "; do grep -rlsF -e $c /opt /root /home /tmp /dev/shm /run /etc /var/log; done; "
                               "pgrep -u gpu-session; id -u gpu-session 2>/dev/null; pgrep -x sleep; curl -s -o /dev/null -w %{http_code} http://127.0.0.1:8000/ || true'")  # fmt: skip
    assert left.strip() in ("000", ""), left
    # Nothing secret travelled back in events or errors.
    assert not any(c in str(e) for e in events for c in canaries)


def test_a_surviving_canary_fails_naming_where_not_what(hosts, keypair):
    target = hosts["lambda"]
    leak = f"canary-leak-{secrets.token_hex(8)}"
    on(target, keypair, f"echo {leak} | sudo tee /etc/gpu-session-leaked.conf >/dev/null")
    with pytest.raises(ConfigureError) as err:
        run(target, role="scrub", extravars={"scrub_canaries": [leak]})
    assert "/etc/gpu-session-leaked.conf" in str(err.value) and leak not in str(err.value)
    on(target, keypair, "sudo rm /etc/gpu-session-leaked.conf")


def test_scrub_of_a_clean_host_succeeds_and_changes_nothing(hosts):
    """Through the playbook `pulumi destroy` and `invoke down` run."""
    target = hosts["runpod"]
    run(target, playbook="scrub.yml")
    again = run(target, playbook="scrub.yml")
    assert again.changed == 0 and again.facts["scrub_receipt"]["removed"] == []


def test_scrub_removes_links_to_prebuilt_venvs_never_what_they_point_to(hosts, keypair):
    """The simulator's hosts link their engines to venvs shared by every host (model_server_prebuilt_venvs):
    scrub removes the links with the data root and leaves the venvs whole, whatever the links point at."""
    target = hosts["runpod"]
    run(target, role="host_base")
    token = f"canary-token-{secrets.token_hex(8)}"
    venvs = "/var/cache/gpu-session/venvs"
    venv = f"{venvs}/hub-{'0' * 16}"  # made in the host's own copy-on-write /var, not the machine's
    on(
        target,
        keypair,
        f"""sudo sh -c '
        mkdir -p {venv}/bin /opt/gpu-session/engines && echo lock > {venv}/.gpu-session-lock && ln -sf /usr/bin/python3 {venv}/bin/python
        ln -s {venv} /opt/gpu-session/engines/hub
        ln -s {venv}/bin /opt/gpu-session/engines/bin
        ln -s {venv}/.gpu-session-lock /opt/gpu-session/engines/hub.lock
        ln -s {venvs} /opt/gpu-session/engines/all
        echo HF_TOKEN={token} >> /opt/gpu-session/env'""",
    )
    listing = f"sudo sh -c 'find {venvs} | sort | md5sum; cat {venv}/.gpu-session-lock'"
    before = on(target, keypair, listing)
    receipt = run(target, role="scrub", extravars={"scrub_canaries": [token]}).facts["scrub_receipt"]
    assert receipt["ok"] is True and "/opt/gpu-session" in receipt["removed"]
    assert on(target, keypair, listing) == before and before.endswith("lock\n")
    assert on(target, keypair, "test -e /opt/gpu-session || echo gone").strip() == "gone"
    on(target, keypair, f"sudo rm -r {venv}")
