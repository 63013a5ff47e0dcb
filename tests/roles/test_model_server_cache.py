"""The cache volume (gpu_session_cache_root), on a simulator host through site.yml and scrub.yml:
a folder of the host's own /var stands in for the volume (the role sees only a path). The first
converge installs the engine and downloads the weights into it; scrub wipes the session and keeps
them (the receipt says what and why, no canary is on the volume); a fresh converge reuses both, and
takes uv from the volume when it is the controller's (a planted one is replaced, never run). A
cached venv whose lock copy was tampered with is rebuilt, a corrupted weight blob downloaded again,
a full volume refused before any download, and a gated model (model_server_cache_weights false)
downloaded into the data root, not the volume. The tests run in order, on one host."""

from __future__ import annotations

import hashlib
import secrets
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from conftest import on, ssh

from gpu_session.host import engines
from gpu_session.host.ansible import ConfigureError, run
from gpu_session.sim.models import TINY_TEXT, TINY_VISION

VOLUME = "/var/lib/gpu-session-test-volume"
CACHE = f"{VOLUME}/gpu-session"
MODEL_DIR = f"{CACHE}/hub/models--gpu-session--tiny-chat"
ENGINE = "transformers-cpu"
# The uv host_base copies: the one beside the Python that runs Ansible (host_base_uv_binary).
CONTROLLER_UV = Path(sys.executable).with_name("uv")
TAKE_UV = "Read the installed uv's version, or take uv from the cache volume"


@pytest.fixture(scope="module")
def site(sim, hosts, wheelhouse, keypair):
    """site.yml on the Lambda host with a cache volume, transformers serve (it starts in seconds)."""
    target = hosts["lambda"]
    on(target, keypair, f"sudo mkdir -p {VOLUME}")
    good = {
        "model_server_model": TINY_TEXT,
        "model_server_backend": "transformers",
        "model_server_device": "cpu",
        "model_server_api_key": secrets.token_urlsafe(32),
        "model_server_wheelhouse": str(wheelhouse),
        "host_base_hf_endpoint": sim.host_url,
        "lease_expires_at": (datetime.now(UTC) + timedelta(hours=2)).replace(microsecond=0).isoformat(),
        "gpu_session_cache_root": VOLUME,
        "gpu_session_full_converge": True,
    }

    def converge(events=None, **changes):
        events = [] if events is None else events
        return run(target, playbook="site.yml", extravars={**good, **changes}, on_event=events.append)

    return target, converge


def said(events, task: str) -> list[str]:
    return [e.message for e in events if e.task == task and e.kind in ("ok", "changed")]


def ran(events, task: str) -> bool:
    return any(e.task == task and e.kind in ("ok", "changed") for e in events)


def sh(target, keypair, script: str) -> str:
    return on(target, keypair, f"sudo sh -c '{script}'")


def grep_volume(target, keypair, canaries: list[str]) -> str:
    """The files on the volume holding a canary, read in full (binary too): minutes, not on()'s 30 s."""
    from gpu_session.clouds import SshEndpoint

    patterns = " ".join(f"-e {c}" for c in canaries)
    out = ssh(SshEndpoint(target.host, target.port, target.user), keypair, f"sudo grep -rlsaF {patterns} {VOLUME}; true",
              known_hosts=target.known_hosts, strict=True, timeout=600)  # fmt: skip
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_the_first_converge_installs_and_downloads_into_the_cache(site, keypair):
    target, converge = site
    events = []
    result = converge(events)
    assert result.facts["model_server_cache"] == {"root": VOLUME, "engine": "installed", "weights": "downloaded"}
    assert said(events, f"Install {ENGINE}") == ["installed linked"] and ran(events, "Start the download")
    venv = f"{CACHE}/venvs/{ENGINE}-{engines.lock_digest(ENGINE)}"
    assert sh(target, keypair, f"readlink /opt/gpu-session/engines/{ENGINE}").strip() == venv
    # The venv's Python is on the volume too, never in the data root scrub wipes.
    python = sh(target, keypair, f"readlink -f {venv}/bin/python").strip()
    assert python.startswith(VOLUME) or not python.startswith("/opt/gpu-session"), python
    # The weights are in the volume's Hub cache, sealed (root's, read-only); the data root has none.
    blobs = sh(target, keypair, f'stat -c "%U %a" {MODEL_DIR}/blobs/*').splitlines()
    assert blobs and set(blobs) == {"root 444"}, blobs
    assert sh(target, keypair, "ls /opt/gpu-session/hf/hub 2>/dev/null | grep models-- || echo none").strip() == "none"
    env = sh(target, keypair, "cat /opt/gpu-session/bin/gpu-session-env")
    assert f"HF_HUB_CACHE={CACHE}/hub" in env and f"VLLM_CACHE_ROOT={CACHE}/vllm" in env
    # The controller's uv, copied over SSH, is kept on the volume for the next host (root's, 0755).
    assert said(events, TAKE_UV) == ["missing"] and ran(events, "Copy uv from the controller")
    assert said(events, "Keep uv on the cache volume") == ["kept"]
    assert sh(target, keypair, f'stat -c "%U %a %n" {CACHE}/bin/*').split() == ["root", "755", cached_uv()]
    assert sh(target, keypair, f"sha256sum < {cached_uv()}").split()[0] == controller_uv_sha256()
    # A fresh host has no server to stop before the first start (configure.yml created its bin).
    assert not ran(events, "Stop the session's daemons") and ran(events, "Start the model server as a daemon")


def cached_uv() -> str:
    import subprocess

    version = subprocess.run([CONTROLLER_UV, "--version"], capture_output=True, text=True, check=True).stdout.split()[1]
    return f"{CACHE}/bin/uv-{version}"


def controller_uv_sha256() -> str:
    return hashlib.sha256(CONTROLLER_UV.read_bytes()).hexdigest()


def test_scrub_keeps_the_cache_proves_no_canary_on_it_and_a_fresh_converge_reuses_both(site, keypair):
    target, converge = site
    canaries = [f"gpu-session-canary-{secrets.token_hex(8)}" for _ in range(6)]
    converge(gpu_session_canaries=canaries)
    before = sh(target, keypair, f"stat -c %i {CACHE}/venvs/{ENGINE}-*/.gpu-session-lock; ls {MODEL_DIR}/blobs | sort")
    receipt = run(target, playbook="scrub.yml", extravars={"scrub_canaries": canaries, "gpu_session_cache_root": VOLUME})
    receipt = receipt.facts["scrub_receipt"]
    assert receipt["ok"] is True and "/opt/gpu-session" in receipt["removed"]
    assert receipt["cache"]["root"] == VOLUME and f"{CACHE}/hub/.locks" in receipt["cache"]["removed"]
    kept = {k["path"]: k["why"] for k in receipt["cache"]["kept"]}
    venvs = [p for p in kept if p.startswith(f"{CACHE}/venvs/")]
    assert {p.rsplit("/", 1)[1].rsplit("-", 1)[0] for p in venvs} == {"hub", ENGINE}
    assert all(kept[p] == "engine venv, keyed by its lock's digest" for p in venvs)
    assert "checked against its Hub hash" in kept[MODEL_DIR] and "not hashed again" in kept[f"{CACHE}/verified"]
    assert "checked against the controller's uv" in kept[cached_uv()]
    assert VOLUME in receipt["verified"]["searched"] and receipt["cache"]["search"]["sealed_blobs_skipped"] >= 1
    # Checked again from outside: no canary on the volume, the cache whole, the data root gone.
    print("cache search:", receipt["cache"]["search"])
    assert grep_volume(target, keypair, canaries).strip() == ""
    assert sh(target, keypair, f"stat -c %i {CACHE}/venvs/{ENGINE}-*/.gpu-session-lock; ls {MODEL_DIR}/blobs | sort") == before
    assert sh(target, keypair, "test -e /opt/gpu-session || echo gone").strip() == "gone"
    # The lock files stay, empty (unlinking one a session holds would let two sessions write at once).
    assert sh(target, keypair, f"find {CACHE}/locks -type f ! -empty; ls -d {CACHE}/hub/.locks 2>/dev/null; true").strip() == ""
    # A fresh converge on the scrubbed host, without uv as a new host is: nothing installed, nothing
    # downloaded, uv taken from the volume rather than copied from the controller.
    sh(target, keypair, "rm /usr/local/bin/uv")
    events = []
    result = converge(events)
    assert said(events, TAKE_UV) == ["cached"] and not ran(events, "Copy uv from the controller")
    assert not ran(events, "Stop the session's daemons")  # scrubbed: no server, and no bin, is left
    assert sh(target, keypair, "sha256sum < /usr/local/bin/uv").split()[0] == controller_uv_sha256()
    assert result.facts["model_server_cache"] == {"root": VOLUME, "engine": "reused", "weights": "reused"}
    assert said(events, f"Install {ENGINE}") == ["reused linked"] and said(events, "Install hub") == ["reused linked"]
    assert not ran(events, "Start the download") and not ran(events, "Wait for the download")
    assert sh(target, keypair, f"stat -c %i {CACHE}/venvs/{ENGINE}-*/.gpu-session-lock; ls {MODEL_DIR}/blobs | sort") == before


def test_scrub_leaves_a_download_another_session_runs_on_the_volume(site, keypair):
    """Two sessions share a volume: while the other holds the model's download lock, its partial
    file and huggingface_hub's lock stay; once it is done, the next scrub removes them."""
    import hashlib

    target, converge = site
    lock = f"{CACHE}/locks/hub-{hashlib.sha256(TINY_TEXT.encode()).hexdigest()[:16]}.lock"
    partial, hub_lock = f"{MODEL_DIR}/blobs/0123abcd.incomplete", f"{CACHE}/hub/.locks/models--gpu-session--tiny-chat"
    sh(target, keypair, f"echo half > {partial}; mkdir -p {hub_lock}; touch {hub_lock}/0123abcd.lock")
    sh(target, keypair, f"setsid flock {lock} sleep 987 </dev/null >/dev/null 2>&1 &")
    try:
        assert "sleep 987" in sh(target, keypair, "sleep 1; ps -eo args")
        kept = run(target, playbook="scrub.yml", extravars={"scrub_canaries": [], "gpu_session_cache_root": VOLUME})
        assert partial not in kept.facts["scrub_receipt"]["cache"]["removed"]
        assert set(sh(target, keypair, f"ls {partial} {hub_lock}/0123abcd.lock").split()) == {
            partial,
            f"{hub_lock}/0123abcd.lock",
        }
    finally:
        sh(target, keypair, 'pkill -f "sleep 98[7]"; true')  # [7]: not this shell's own command line
    done = run(target, playbook="scrub.yml", extravars={"scrub_canaries": [], "gpu_session_cache_root": VOLUME})
    assert {partial, hub_lock} <= set(done.facts["scrub_receipt"]["cache"]["removed"])
    assert sh(target, keypair, f"ls {partial} {hub_lock} 2>/dev/null; true").strip() == ""
    assert sh(target, keypair, f"test -f {lock} && echo kept").strip() == "kept"
    converge()  # the host as the next test expects it: served, from the cache


def test_a_uv_on_the_volume_that_is_not_the_controllers_is_replaced_never_run(site, keypair):
    target, converge = site
    planted = "/var/tmp/planted-uv-ran"
    sh(target, keypair, f'rm -f /usr/local/bin/uv {planted}; printf "#!/bin/sh\\ntouch {planted}\\n" > {cached_uv()}')
    events = []
    converge(events, host_base_controller_uv=[])  # the role's own lookup of the controller's uv, as without gpu-session
    assert said(events, TAKE_UV) == ["missing"] and ran(events, "Copy uv from the controller")
    assert said(events, "Keep uv on the cache volume") == ["kept"]
    for path in ("/usr/local/bin/uv", cached_uv()):
        assert sh(target, keypair, f"sha256sum < {path}").split()[0] == controller_uv_sha256(), path
    assert sh(target, keypair, f"test -e {planted} && echo ran || echo never").strip() == "never"


def test_a_bin_folder_made_a_link_elsewhere_is_neither_read_nor_written(site, keypair):
    """bin/ swapped for a link to a folder of the host's: root neither takes uv from it nor writes into
    it (nor changes its mode); the session copies uv from the controller as without a volume."""
    target, converge = site
    elsewhere = "/var/tmp/elsewhere"
    sh(target, keypair, f"rm -rf {elsewhere} {CACHE}/bin /usr/local/bin/uv; mkdir -m 0700 {elsewhere}; "
                        f"ln -s {elsewhere} {CACHE}/bin")  # fmt: skip
    events = []
    converge(events)
    assert said(events, TAKE_UV) == ["missing"] and ran(events, "Copy uv from the controller")
    [kept] = said(events, "Keep uv on the cache volume")
    assert "is a link or not owned by root" in kept, kept
    assert sh(target, keypair, f'ls -A {elsewhere}; stat -c "%a" {elsewhere}').split() == ["700"]
    sh(target, keypair, f"rm {CACHE}/bin /usr/local/bin/uv; rm -rf {elsewhere}")
    converge()  # the host as the next test expects it, uv kept on the volume again
    assert sh(target, keypair, f"sha256sum < {cached_uv()}").split()[0] == controller_uv_sha256()


def test_a_cached_venv_whose_lock_copy_was_tampered_with_is_rebuilt(site, keypair):
    target, converge = site
    sh(target, keypair, f"for lock in {CACHE}/venvs/hub-*/.gpu-session-lock; do echo tampered >> $lock; done")
    events = []
    converge(events)
    assert said(events, "Install hub") == ["installed"]
    assert sh(target, keypair, f"cat {CACHE}/venvs/hub-*/.gpu-session-lock") == (engines.LOCKS / "hub.txt").read_text()


def test_a_corrupted_weight_blob_is_downloaded_again(site, keypair):
    target, converge = site
    blob = sh(target, keypair, f"ls -S {MODEL_DIR}/blobs | head -n 1").strip()
    assert len(blob) == 64  # the weights: an LFS file, named by its sha256
    # Hashed once, it has a record; a write that keeps its size and puts its mtime back still shows
    # (its ctime moved), so it is hashed again rather than trusted.
    record = f"{CACHE}/verified/models--gpu-session--tiny-chat/{blob}"
    assert sh(target, keypair, f"test -f {record} && stat -c %a {CACHE}/verified").strip() == "700"
    sh(target, keypair, f"touch -r {MODEL_DIR}/blobs/{blob} /tmp/blob-times")
    sh(target, keypair, f"printf corrupt | dd of={MODEL_DIR}/blobs/{blob} bs=1 seek=100 conv=notrunc 2>/dev/null")
    sh(target, keypair, f"touch -r /tmp/blob-times {MODEL_DIR}/blobs/{blob}")
    assert sh(target, keypair, f"sha256sum < {MODEL_DIR}/blobs/{blob}").split()[0] != blob
    events = []
    result = converge(events)
    assert result.facts["model_server_cache"]["weights"] == "downloaded" and ran(events, "Wait for the download")
    assert sh(target, keypair, f"sha256sum < {MODEL_DIR}/blobs/{blob}").split()[0] == blob
    assert sh(target, keypair, f"cat {record}").split()[0] == sh(target, keypair, f"stat -c %i {MODEL_DIR}/blobs/{blob}").strip()


def test_a_blobs_folder_made_a_link_elsewhere_is_dropped_not_followed(site, keypair):
    """The service user writes the Hub cache: a `blobs` turned into a link to another folder, whose
    files bear the blobs' names and other bytes, must not lead root to remove or seal them there."""
    target, converge = site
    decoys = "/var/tmp/decoys"
    sh(
        target,
        keypair,
        f"rm -rf {decoys} && mkdir {decoys} && for b in {MODEL_DIR}/blobs/*; do echo decoy > {decoys}/$(basename $b); done",
    )
    sh(target, keypair, f"mv {MODEL_DIR}/blobs /var/tmp/real-blobs && ln -s {decoys} {MODEL_DIR}/blobs")
    events = []
    result = converge(events)
    assert result.facts["model_server_cache"]["weights"] == "downloaded" and ran(events, "Wait for the download")
    assert sh(target, keypair, f"test -L {MODEL_DIR}/blobs || echo folder").strip() == "folder"
    left = sh(target, keypair, f"cat {decoys}/* | sort -u; stat -c %U:%a {decoys}/* | sort -u").split()
    assert left == ["decoy", "root:644"], left  # neither removed nor sealed
    sh(target, keypair, f"rm -rf {decoys} /var/tmp/real-blobs")


def test_a_full_volume_fails_before_any_download_saying_what_to_do(site, keypair):
    """The volume capped at 1 GB already holds more (the engine's torch): nothing fits."""
    target, converge = site
    with pytest.raises(ConfigureError) as err:
        converge(model_server_model=TINY_VISION, gpu_session_cache_size_gb=1)
    message = str(err.value)
    assert f"The cache volume at {VOLUME} has 0.0 GiB free" in message, message
    # The role's words name the script; they reach a checkout's user as invoke's (errors.in_our_words).
    assert "`invoke cache.rm`" in message and "`invoke cache.create --size <GB>`" in message, message
    assert "`invoke up --no-cache`" in message and "gpu-session cache" not in message, message
    assert sh(target, keypair, f"ls {CACHE}/hub | grep tiny-vision || echo none").strip() == "none"
    # A venv to rebuild on a full volume: refused before anything is removed or installed.
    sh(target, keypair, f"for lock in {CACHE}/venvs/hub-*/.gpu-session-lock; do echo tampered >> $lock; done")
    with pytest.raises(
        ConfigureError, match=rf"The cache volume at {VOLUME} has 0\.0 GiB free and installing hub needs 1 GiB"
    ) as err:
        converge(gpu_session_cache_size_gb=1)
    assert "`invoke cache.rm`" in str(err.value) and "`invoke up --no-cache`" in str(err.value)
    assert sh(target, keypair, f"tail -n 1 {CACHE}/venvs/hub-*/.gpu-session-lock").strip() == "tampered"  # left as it was


def test_a_gated_model_not_allowed_on_the_volume_downloads_into_the_data_root(site, keypair):
    """The controller passes model_server_cache_weights false for a gated model (without --cache-gated);
    the role follows it whatever the model (here tiny-chat, whose weights the volume holds already)."""
    target, converge = site
    listing = f"find {CACHE}/hub -path {CACHE}/hub/.locks -prune -o -print | sort | md5sum"  # .locks: scrub's to remove
    before = sh(target, keypair, listing)
    events = []
    result = converge(events, model_server_cache_weights=False)
    assert result.facts["model_server_cache"] == {"root": VOLUME, "engine": "reused", "weights": "not cached (gated)"}
    assert ran(events, "Wait for the download")
    assert sh(target, keypair, "ls /opt/gpu-session/hf/hub").split().count("models--gpu-session--tiny-chat") == 1
    assert sh(target, keypair, listing) == before
    env = sh(target, keypair, "cat /opt/gpu-session/bin/gpu-session-env")
    assert "HF_HUB_CACHE" not in env and f"VLLM_CACHE_ROOT={CACHE}/vllm" in env
    # Scrub takes the data root's weights and leaves the volume as it was.
    run(target, playbook="scrub.yml", extravars={"gpu_session_cache_root": VOLUME})
    assert sh(target, keypair, listing) == before


def test_a_canary_on_the_volume_fails_scrub_naming_where_not_what(site, keypair):
    """Something of the session written into what the volume keeps (vLLM's cache, which the server
    writes) is found, binary or not: scrub fails, naming the file and never the canary."""
    target, _ = site
    canary = f"gpu-session-canary-{secrets.token_hex(8)}"
    leak = f"{CACHE}/vllm/leaked.bin"
    sh(target, keypair, f'printf "\\000\\001{canary}" > {leak}')
    with pytest.raises(ConfigureError) as err:
        run(target, playbook="scrub.yml", extravars={"scrub_canaries": [canary], "gpu_session_cache_root": VOLUME})
    said = str(err.value)
    assert leak in said and canary not in said and "`invoke cache.rm`" in said and "`invoke down`" in said, said
    sh(target, keypair, f"rm {leak}")
