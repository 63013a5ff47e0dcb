"""model_server's bad input, on a simulator host through site.yml: each fails before it can do harm,
with a message that says what to do; then site.yml's early end for a converge that would change
nothing; the download's progress on each try of its wait, and its job, which scrub ends when an
interrupted converge left it running; the session's canaries, planted by site.yml and proven gone
by scrub; each engine serving what the simulator taught its models, vLLM on 127.0.0.1 alone, only
with the key, and idempotent (a converge that runs every task again restarts nothing).
(transformers serve's privacy and idempotence are proven by the role's molecule scenario: converge,
idempotence with every task run, testinfra.)"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import secrets
import shlex
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from conftest import on

from gpu_session import progress
from gpu_session.host import converge as host_converge
from gpu_session.host import engines
from gpu_session.host.ansible import ConfigureError, run
from gpu_session.host.ssh import SessionKeys
from gpu_session.sim.models import COLOUR_QUESTION, COLOUR_REPLIES, KNOWN_REPLIES, SYSTEM_PROMPTS, TINY_TEXT, TINY_VISION


@pytest.fixture(scope="module")
def site(sim, hosts, wheelhouse, prebuilt_venvs):
    """site.yml on the Lambda host (ubuntu + sudo), with what a session passes: the simulator's hosts
    have no real GPU, and the caller says so (the role never guesses the device)."""
    lease_end = (datetime.now(UTC) + timedelta(hours=2)).replace(microsecond=0).isoformat()
    good = {
        "model_server_model": "gpu-session/tiny-chat",
        "model_server_device": "cpu",
        "model_server_api_key": secrets.token_urlsafe(32),
        "model_server_wheelhouse": str(wheelhouse),
        "model_server_prebuilt_venvs": str(prebuilt_venvs),
        "host_base_hf_endpoint": sim.host_url,
        "lease_expires_at": lease_end,
    }

    def converge(events=None, **changes):
        events = [] if events is None else events
        try:
            return run(hosts["lambda"], playbook="site.yml", extravars={**good, **changes}, on_event=events.append)
        finally:
            assert not any(good["model_server_api_key"] in str(e) for e in events)

    return hosts["lambda"], good, converge


def test_a_model_id_that_would_inject_shell_is_refused(site, keypair):
    target, _, converge = site
    with pytest.raises(ConfigureError, match="Hub id like owner/name"):
        converge(model_server_model="a/b; touch /tmp/pwned")
    assert on(target, keypair, "ls /tmp/pwned 2>/dev/null || echo absent").strip() == "absent"


def test_a_weak_api_key_is_refused_without_showing_it(site):
    _, _, converge = site
    with pytest.raises(ConfigureError, match="32 or more") as err:
        converge(model_server_api_key="short-key-123")
    assert "short-key-123" not in str(err.value)


def test_the_device_is_cuda_or_cpu_and_nothing_else(site):
    _, _, converge = site
    with pytest.raises(ConfigureError, match="model_server_device.*cuda, cpu"):
        converge(model_server_device="auto")


def test_a_gated_model_without_a_token_says_what_to_do(site):
    _, _, converge = site
    with pytest.raises(ConfigureError, match="is gated: accept its license .* give an HF token"):
        converge(model_server_model="meta-llama/Llama-3.2-1B-Instruct")


def test_a_model_too_big_fails_before_any_download_naming_need_and_have(site, sim, keypair):
    """By the plan's rule (files/gpu_session_fit.py): the weights and the KV cache of the asked
    context against the memory nvidia-smi reports, times vLLM's share, less the allowance."""
    target, _, converge = site
    with pytest.raises(
        ConfigureError,
        match=r"needs 13\d\.\d GiB of GPU memory for 8,192 tokens of context .* this host's 1 GPU\(s\) give 18\.7 GiB",
    ):
        converge(model_server_model="meta-llama/Llama-3.1-70B-Instruct", model_server_hf_token=sim.hf_token)
    assert "Llama-3.1-70B" not in on(target, keypair, "sudo ls -R /opt/gpu-session/hf")


def test_an_nvidia_driver_too_old_for_the_engines_cuda_fails_before_any_download(site, keypair):
    """A RunPod host placed without regard to CUDA has driver 550 (CUDA 12.4); the CUDA engines need 580."""
    target, _, converge = site
    old = "echo '#!/bin/sh' > /tmp/old-smi && echo 'echo 0, NVIDIA A10, 23028, 550.127.05' >> /tmp/old-smi && chmod 755 /tmp/old-smi"
    on(target, keypair, f"sudo sh -c {shlex.quote(old)}")
    with pytest.raises(ConfigureError, match=r"NVIDIA driver is 550\.127\.05; .* needs driver 580 or newer"):
        converge(model_server_device="cuda", gpu_check_nvidia_smi="/tmp/old-smi", gpu_session_full_converge=True)
    assert on(target, keypair, "sudo ls /opt/gpu-session/engines/ 2>/dev/null | grep cuda || echo none").strip() == "none"
    on(target, keypair, "sudo rm /tmp/old-smi")


def test_extra_arguments_are_passed_quoted_and_a_failed_start_shows_the_log(site, keypair):
    target, good, converge = site
    with pytest.raises(ConfigureError, match=r"(?s)not ready \(Wait for the port.*the model server exited.*--seed") as err:
        converge(model_server_extra_args=["--seed", "1; touch /tmp/pwned-extra"])
    assert "invalid int value: '1; touch /tmp/pwned-extra'" in str(err.value)
    assert on(target, keypair, "ls /tmp/pwned-extra 2>/dev/null || echo absent").strip() == "absent"
    assert good["model_server_api_key"] not in str(err.value)


def test_an_unchanged_converge_ends_early_and_a_changed_one_runs_in_full(site, keypair):
    """transformers serve with the text model: it starts in seconds."""
    target, good, converge = site
    converge(model_server_backend="transformers")
    events = []
    assert converge(events, model_server_backend="transformers").changed == 0
    ran = [e.task for e in events if e.kind in ("ok", "changed")]
    assert ran == ["Work out this converge's digest", "Check the last converge and the server"], ran
    # A changed input (the lease's check interval) runs every role again, and changes only that.
    events = []
    result = converge(events, model_server_backend="transformers", lease_check_interval_s=7)
    assert "Install the watchdog" in [e.task for e in events] and result.changed >= 1
    # The tasks converge times (PHASES) and draws as phases (STEPS) by name all ran, named as it expects.
    from gpu_session.host.converge import PHASES, STEPS

    named = {task for tasks in PHASES.values() for task in tasks} | {
        task for bounds in STEPS.values() for tasks in bounds for task in tasks
    }
    expected = {task for task in named if not task.startswith("Install ") or task in ("Install hub", "Install transformers-cpu")}
    assert expected <= {e.task for e in events if e.kind == "task"}, expected - {e.task for e in events}
    # A new API key (the secrets' task, whose result no_log hides, changed included) restarts the
    # running server: stopped, then started anew.
    pid = on(target, keypair, f"sudo cat {SERVER_PID}").strip()
    events, key = [], secrets.token_urlsafe(32)
    converge(events, model_server_backend="transformers", lease_check_interval_s=7, model_server_api_key=key)
    # The key is in the secrets file and nowhere else a converge writes (Ansible's temporary files,
    # logs). Looked for with the file's own key, on grep's stdin: never on a command line.
    found = on(
        target,
        keypair,
        """sudo bash -c 'k=$(sed -n "s/^GPU_SESSION_API_KEY=//p" /opt/gpu-session/model-server.env)
        printf %s "$k" | sha256sum; grep -rlF -f <(printf "%s\\n" "$k") /tmp /var/log /root /home /opt/gpu-session 2>/dev/null; true'""",
    )
    assert found.split()[0] == hashlib.sha256(key.encode()).hexdigest()  # the new key is the file's
    assert found.split()[2:] == ["/opt/gpu-session/model-server.env"], found
    changed = {e.task for e in events if e.kind == "changed"}
    assert {"Stop the session's daemons", "Start the model server as a daemon"} <= changed, changed
    assert on(target, keypair, f"sudo cat {SERVER_PID}").strip() != pid
    # A server that stopped answering is a reason to run everything too.
    on(target, keypair, f"sudo sh -c 'kill $(cat {SERVER_PID})'")
    events = []
    converge(events, model_server_backend="transformers", lease_check_interval_s=7)
    assert "Ask for one token" in [e.task for e in events]


def test_a_prebuilt_venv_of_another_lock_is_not_linked(site, keypair, prebuilt_venvs):
    """Only a venv whose lock copy is byte for byte the role's own is linked: one named right but
    built from another lock (or left half-built) is ignored, and the engine installs as without one."""
    target, _, converge = site
    other = "/var/tmp/other-venvs"  # in the host's own copy-on-write /var
    hub, served = (engines.prebuilt_venv(e, Path(other)) for e in ("hub", "transformers-cpu"))
    prepare = (
        f"mkdir -p {hub}/bin && ln -s /usr/bin/python3 {hub}/bin/python && echo other-lock > {hub}/.gpu-session-lock"
        f" && ln -s {engines.prebuilt_venv('transformers-cpu', prebuilt_venvs)} {served}"
    )
    on(target, keypair, f"sudo sh -c '{prepare}'")
    converge(model_server_backend="transformers", model_server_prebuilt_venvs=other)
    shown = "for e in hub transformers-cpu; do readlink /opt/gpu-session/engines/$e || echo installed; done"
    assert on(target, keypair, f"sudo sh -c '{shown}'").split() == ["installed", str(served)]
    on(target, keypair, f"sudo rm -r {other}")


def test_engines_link_to_the_prebuilt_venvs_which_scrub_leaves_alone(site, sim, keypair, prebuilt_venvs):
    """A simulator host links each engine to the venv `invoke engines` built from the same lock (no
    gigabytes of torch per host), writes nothing into it, and scrub takes the links, never their targets."""
    target, _, converge = site
    converge(model_server_backend="transformers")
    shown = "for e in hub transformers-cpu; do readlink /opt/gpu-session/engines/$e; done"
    links = on(target, keypair, f"sudo sh -c '{shown}'").split()
    assert links == [str(engines.prebuilt_venv(e, prebuilt_venvs)) for e in ("hub", "transformers-cpu")]
    # Serving wrote nothing into the shared venvs: the host's copy-on-write layer of /var holds none of them.
    [host_id] = [
        i["id"] for i in sim.instances() if i["host_dir_exists"] and (i["address"], i["ssh_port"]) == (target.host, target.port)
    ]
    upper = sim.host_dir(host_id) / "var" / "upper" / prebuilt_venvs.relative_to("/var")
    assert not upper.exists() or not any(upper.iterdir()), sorted(upper.rglob("*"))[:20]
    receipt = run(target, playbook="scrub.yml").facts["scrub_receipt"]
    assert "/opt/gpu-session" in receipt["removed"]
    # Each venv is still whole on the host: its Python runs, and its lock is the one it is named for.
    check = "; ".join(f"{v}/bin/python -c pass && sha256sum < {v}/.gpu-session-lock | cut -c1-16" for v in links)
    left = on(target, keypair, f"sudo sh -c '{check}; test -e /opt/gpu-session || echo gone'").split()
    assert left == [v.rsplit("-", 1)[1] for v in links] + ["gone"]


@pytest.mark.parametrize("backend", ["vllm", "transformers"])
@pytest.mark.parametrize("model", [TINY_TEXT, TINY_VISION])
def test_the_small_models_say_what_they_were_taught(site, keypair, model, backend):
    """Asked greedily, each engine gives the sentences the simulator taught its models: the same
    weights make the same replies on vLLM's CPU build and on transformers serve."""
    target, good, converge = site
    converge(model_server_model=model, model_server_backend=backend)
    if backend == "vllm":  # what model_server's molecule scenario proves of transformers serve
        listeners = on(target, keypair, "ss -Htln 'sport = :8000'").splitlines()
        assert [line.split()[3] for line in listeners] == ["127.0.0.1:8000"], listeners
        for key in ("", f"-H 'Authorization: Bearer {'x' * 40}'"):  # none, or not ours: refused
            assert (
                on(target, keypair, f"curl -s -o /dev/null -w '%{{http_code}}' {key} http://127.0.0.1:8000/v1/models").strip()
                == "401"
            )
        # Idempotent under vLLM too (molecule's idempotence step proves it of transformers): a
        # converge whose one change is the lease's check interval runs every task again, and of
        # the model server's none changes: the server is not restarted.
        pid = on(target, keypair, f"sudo cat {SERVER_PID}").strip()
        events = []
        result = converge(events, model_server_model=model, model_server_backend=backend, lease_check_interval_s=7)
        assert "Ask for one token" in {e.task for e in events}  # every role ran, the server's checks too
        # Two changes: the converge's digest, and the lease's file (a no_log task: its event hides
        # the change, the recap counts it), which now holds the new interval.
        visible = [e.task for e in events if e.kind == "changed"]
        assert visible == ["Remember this converge's digest"] and result.changed == len(visible) + 1, (visible, result.changed)
        lease = "import json; print(json.load(open('/etc/gpu-session/lease.json'))['interval'])"
        assert on(target, keypair, f'sudo python3 -c "{lease}"').strip() == "7"
        assert on(target, keypair, f"sudo cat {SERVER_PID}").strip() == pid

    def ask(*messages) -> str:
        """curl on the host (the port is reachable nowhere else): the whole reply, which the model ended."""
        body = json.dumps({"model": model, "messages": list(messages), "temperature": 0, "max_tokens": 48})
        headers = f"-H 'Content-Type: application/json' -H 'Authorization: Bearer {good['model_server_api_key']}'"
        answer = on(target, keypair, f"curl -sf --max-time 120 {headers} --data-binary {shlex.quote(body)} {URL}")
        [choice] = json.loads(answer)["choices"]
        assert choice["finish_reason"] == "stop", choice
        return choice["message"]["content"]

    known = KNOWN_REPLIES[model]
    assert ask({"role": "user", "content": "Say hello"}) == known["Say hello"]
    assert ask({"role": "system", "content": SYSTEM_PROMPTS[1]}, {"role": "user", "content": "Hello"}) == known["Hello"]
    earlier = [
        {"role": "user", "content": "What colour is the sky?"},
        {"role": "assistant", "content": known["What colour is the sky?"]},
    ]
    assert ask(*earlier, {"role": "user", "content": "Hi"}) == known["Hi"]
    if model == TINY_VISION:
        for colour, rgb in (("red", (200, 30, 30)), ("blue", (0, 0, 255))):
            question = [{"type": "text", "text": COLOUR_QUESTION}, {"type": "image_url", "image_url": {"url": png(rgb)}}]
            assert ask({"role": "user", "content": question}) == COLOUR_REPLIES[colour]


URL = "http://127.0.0.1:8000/v1/chat/completions"
SERVER_PID = "/run/gpu-session/gpu-session-model-server.pid"


def png(rgb: tuple[int, int, int]) -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (64, 48), rgb).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


# The folders the service user's processes write; nothing else of ours is the service user's to write.
SERVICE_WRITES = ("hf", "cache", "tmp", "logs", "uploads", "home")


def test_the_service_user_can_change_nothing_that_root_runs(site, keypair):
    """Root runs the environment script, the helpers and the engines' Pythons (the metadata check,
    the download's wait, the seal) and reads the marker and the converge digest: the service user,
    whose server runs the model's code, may write only the folders its processes write. Found by
    ownership and mode over the whole data root and pid folder, then tried as that user: renaming
    `bin`, swapping the Hub venv for a link, editing the environment script, the environment file
    and the secrets, forging the marker, planting a pidfile; each is refused and the next converge
    finds nothing to change."""
    target, good, converge = site

    def outside() -> list[str]:
        """What the service user may write, or owns, outside the folders its processes write."""
        writable = on(target, keypair, "sudo find /opt/gpu-session /run/gpu-session '(' -user gpu-session"
                                       " -o -group gpu-session -perm -g+w -o -perm -o+w ')' -not -type l")  # fmt: skip
        return [p for p in writable.split() if not p.startswith(tuple(f"/opt/gpu-session/{d}" for d in SERVICE_WRITES))]

    converge(model_server_backend="transformers")
    assert outside() == []
    top = on(target, keypair, "sudo stat -c '%U:%G %a' /opt/gpu-session /opt/gpu-session/bin /opt/gpu-session/engines"
                              " /opt/gpu-session/run /run/gpu-session /opt/gpu-session/bin/gpu-session-env")  # fmt: skip
    assert top.split("\n")[:6] == ["root:gpu-session 750"] * 6, top
    tries = [
        "mv /opt/gpu-session/bin /opt/gpu-session/bin.x",
        "mv /opt/gpu-session/engines/hub /opt/gpu-session/engines/hub.x",
        "ln -sfn /opt/gpu-session/tmp /opt/gpu-session/engines/hub",
        "echo id >> /opt/gpu-session/bin/gpu-session-env",
        "echo id >> /opt/gpu-session/bin/gpu-session-model.py",
        "echo X=1 >> /opt/gpu-session/env",
        "echo X=1 >> /opt/gpu-session/model-server.env",
        "echo {} > /opt/gpu-session/run/model.json",
        "touch /opt/gpu-session/run/converged",
        "touch /run/gpu-session/gpu-session-lease.log.x",
        "touch /opt/gpu-session/engines/hub/bin/python",
    ]
    for attempt in tries:
        out = on(target, keypair, f"sudo runuser -u gpu-session -- sh -c {shlex.quote(attempt)} 2>&1; echo rc=$?")
        assert "rc=0" not in out and "ermission denied" in out, (attempt, out)
    events = []
    converge(events, model_server_backend="transformers", gpu_session_full_converge=True)
    # (gpu_session_full_converge is an input too: the digest it leaves is another)
    changed = [e.task for e in events if e.kind == "changed" and e.task != "Remember this converge's digest"]
    assert changed == [], changed

    # A host an older gpu-session set up: the service user owned the data root, bin, engines and run,
    # and may have left things of its own there. A converge takes all of it back, and removes those.
    on(target, keypair, "sudo sh -c 'chown gpu-session: /opt/gpu-session /opt/gpu-session/engines /opt/gpu-session/run"
                        " /opt/gpu-session/run/model.json && chown -R gpu-session: /opt/gpu-session/bin"
                        " && runuser -u gpu-session -- mkdir -p /opt/gpu-session/bin/__pycache__ /opt/gpu-session/engines/hub.planted'")  # fmt: skip
    converge(model_server_backend="transformers", gpu_session_full_converge=True)
    assert outside() == []
    assert on(target, keypair, "sudo ls /opt/gpu-session/bin /opt/gpu-session/engines").split().count("hub.planted") == 0


def test_each_try_of_the_download_wait_says_its_bytes_and_converge_shows_them(site, sim, keypair):
    """With a slow Hub (one file request waits 7 s, the others are quick), the wait for the download
    tries several times; each try prints the bytes the model's folder holds so far and the weights'
    total, which converge turns into the download's progress line."""
    target, _, converge = site
    on(target, keypair, "sudo rm -rf /opt/gpu-session/run/model.json /opt/gpu-session/hf/hub/models--gpu-session--tiny-chat")
    # The check's reads of config.json and tokenizer_config.json (a HEAD and a GET each) take the first four.
    sim.inject("hf:resolve", "slow", times=8, delay=7)
    events = []
    result = converge(events, model_server_backend="transformers", gpu_session_full_converge=True)
    tries = [e.message for e in events if e.kind == "retry" and e.task == host_converge.DOWNLOAD_WAIT]
    said = [json.loads(t) for t in tries]
    weights = int(result.facts["model_server_weights_bytes"])
    assert weights > 0 and all(s["total"] == weights and not s["finished"] for s in said), said
    assert any(s["bytes"] > 0 for s in said), said
    shown = [progress.read(host_converge.download_progress(t)) for t in tries]
    assert {"phase": "download", "state": "running", "bytes": max(s["bytes"] for s in said), "total": weights} in shown
    # The last try (no retry event) ended the loop with what the download printed: its timing.
    assert float(result.facts["model_server_timings"]["download_s"]) > 0


def test_scrub_ends_a_download_an_interrupted_converge_left_running(site, sim, keypair):
    """The download runs as a job of its own (files/gpu-session-download-job.py), detached from the
    task that starts it, so a converge whose controller dies leaves it running on the host: scrub
    ends it and all it started, before removing the data root it would write into."""
    target, _, _ = site
    on(target, keypair, "sudo rm -rf /opt/gpu-session/hf/hub/models--gpu-session--tiny-chat")
    sim.inject("hf:resolve", "slow", times=1, delay=120)  # the download's first request hangs
    job = "/opt/gpu-session/run/download.json"
    bin_ = "/opt/gpu-session/bin"
    # As "Start the download" runs it (the command returns at once: the job is detached).
    on(target, keypair, f"sudo python3 {bin_}/gpu-session-download-job.py start --job {job} -- runuser -u gpu-session --"
                        f" {bin_}/gpu-session-env /opt/gpu-session/engines/hub/bin/python {bin_}/gpu-session-model.py"
                        " download --model gpu-session/tiny-chat --revision main")  # fmt: skip
    started = json.loads(on(target, keypair, f"sudo cat {job}"))
    assert started["started"] == 1 and isinstance(started["pid"], int), started
    running = on(target, keypair, "pgrep -u gpu-session -f gpu-session-model.py || true").split()
    assert running, "the download is not running"
    status = on(target, keypair, f"sudo {bin_}/gpu-session-env python3 {bin_}/gpu-session-download-job.py status"
                                 f" --job {job} --model gpu-session/tiny-chat")  # fmt: skip
    assert json.loads(status)["finished"] is False, status

    receipt = run(target, playbook="scrub.yml").facts["scrub_receipt"]
    assert receipt["ok"] is True and receipt["ended_interrupted_runs"] is True, receipt
    left = on(target, keypair, "pgrep -f '[g]pu-session-download-job.py|[g]pu-session-model.py' || true").split()
    assert left == [], on(target, keypair, "ps -ef")
    assert on(target, keypair, "sudo ls /opt/gpu-session 2>/dev/null || echo gone").strip() == "gone"


def test_a_session_plants_canaries_where_its_data_goes_and_scrub_proves_them_gone(site, keypair, tmp_path):
    """converge makes the instance's canaries (kept 0600 in the stack's folder, new for a new
    instance); site.yml plants one in each place the session's data goes, as the service user, and a
    converge that runs again plants nothing; scrub then finds none of them, the one in /tmp included."""
    target, _, converge = site
    keys = SessionKeys(tmp_path)
    canaries = host_converge.canaries(keys, "i-canaries")
    assert len(canaries) == host_converge.CANARY_COUNT == 6 and len(set(canaries)) == 6
    assert host_converge.canaries(keys, "i-canaries") == canaries and host_converge.canaries(keys, "i-other") != canaries
    assert oct((tmp_path / host_converge.CANARIES).stat().st_mode & 0o777) == "0o600"
    canaries = host_converge.canaries(keys, "i-canaries")  # another instance had them meanwhile: new ones
    events = []
    converge(events, model_server_backend="transformers", gpu_session_canaries=canaries)
    assert "Plant the session's canaries" in [e.task for e in events if e.kind == "ok"]  # no_log: never "changed" here
    places = [
        "/opt/gpu-session/cache/.gpu-session-canary",  # the data root's caches
        "/opt/gpu-session/uploads/.gpu-session-canary",
        "/opt/gpu-session/logs/model-server.log",
        "/opt/gpu-session/hf/hub/.gpu-session-canary",  # the Hub cache
        "/tmp/gpu-session-canary",
        "/opt/gpu-session/home/.bash_history",  # the service user's home is in the data root
    ]
    search = "; ".join(f"echo $(grep -rlsF -e {c} /opt /tmp /var/tmp /home /root /dev/shm /run /etc /var/log)" for c in canaries)
    assert on(target, keypair, f"sudo sh -c '{search}'").splitlines() == places
    owners = on(target, keypair, "sudo stat -c %U " + " ".join(places)).split()
    assert owners == ["gpu-session"] * len(places), owners
    assert on(target, keypair, "sudo stat -c %a /tmp/gpu-session-canary").strip() == "600"
    # How often each is in its place, and when each file was written (not the log: the server writes it).
    planted = "sudo sh -c '" + "; ".join(f"grep -cF -e {c} {p}" for c, p in zip(canaries, places))
    planted += "; stat -c %Y " + " ".join(p for p in places if not p.endswith(".log")) + "'"
    before = on(target, keypair, planted)
    assert before.split()[: len(places)] == ["1"] * len(places)
    # Planting again changes nothing: the early end still comes after two tasks, and with every task run
    # the planting reports no change.
    events = []
    assert converge(events, model_server_backend="transformers", gpu_session_canaries=canaries).changed == 0
    ran = [e.task for e in events if e.kind in ("ok", "changed")]
    assert ran == ["Work out this converge's digest", "Check the last converge and the server"], ran
    events = []
    converge(events, model_server_backend="transformers", gpu_session_canaries=canaries, gpu_session_full_converge=True)
    assert "Plant the session's canaries" in [e.task for e in events if e.kind == "ok"]
    assert on(target, keypair, planted) == before  # each canary once, no file written again
    # Scrub, given them as converge's scrub gives them, proves each gone: the one in /tmp too.
    receipt = run(target, playbook="scrub.yml", extravars={"scrub_canaries": host_converge.saved_canaries(keys, "i-canaries")})
    receipt = receipt.facts["scrub_receipt"]
    assert receipt["ok"] is True and int(receipt["verified"]["canaries_checked"]) == 6
    assert {"/opt/gpu-session", "/tmp/gpu-session-canary"} <= set(receipt["removed"])
    assert on(target, keypair, f"sudo sh -c '{search}'").split() == []
