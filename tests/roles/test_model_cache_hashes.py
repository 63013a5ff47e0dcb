"""The cache volume's trust in files/gpu-session-model.py: before cached weights are reused, each
file of the revision in a Hub cache (models--o--n/blobs, snapshots, refs) is checked against the
hash the Hub gives for it (an LFS file's sha256, a small git file's git blob sha1, which is also
its blob's name there); one that does not verify is removed, blob and snapshot link, to be
downloaded again. Verified blobs are sealed (read-only), which scrub's canary search relies on.
Real HF-cache-shaped folders, no host."""

from __future__ import annotations

import hashlib
import importlib.util
import os
import subprocess
from pathlib import Path

import pytest

HELPER = Path(__file__).resolve().parents[2] / "roles" / "model_server" / "files" / "gpu-session-model.py"
SEARCH = Path(__file__).resolve().parents[2] / "roles" / "scrub" / "files" / "gpu-session-search-cache.py"
SHA = "a" * 40


@pytest.fixture(scope="module")
def helper():
    spec = importlib.util.spec_from_file_location("gpu_session_model", HELPER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def git_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()  # noqa: S324


def cached_repo(root: Path, files: dict[str, tuple[bytes, bool]]) -> tuple[Path, dict[str, str]]:
    """A Hub cache repo folder as huggingface_hub lays it out: blobs named by etag, snapshot links."""
    folder = root / "models--o--n"
    expected = {}
    for name, (data, lfs) in files.items():
        etag = hashlib.sha256(data).hexdigest() if lfs else git_sha1(data)
        blob = folder / "blobs" / etag
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = folder / "snapshots" / SHA / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
        expected[name] = etag
    (folder / "refs").mkdir(exist_ok=True)
    (folder / "refs" / "main").write_text(SHA)
    return folder, expected


FILES = {
    "model.safetensors": (b"\x00weights" * 1000, True),
    "config.json": (b'{"model_type": "llama"}\n', False),
    "nested/tokenizer.json": (b'{"version": "1.0"}', False),
}


def test_the_hashes_are_the_hubs_the_lfs_sha256_and_the_git_blob_sha1(helper, tmp_path):
    data = b"hello\n"
    (tmp_path / "f").write_bytes(data)
    # `git hash-object` is the reference for the git blob id.
    assert (
        helper.git_blob_sha1(tmp_path / "f")
        == subprocess.check_output(["git", "hash-object", str(tmp_path / "f")], text=True).strip()
    )
    assert helper.sha256_file(tmp_path / "f") == hashlib.sha256(data).hexdigest()
    assert helper.file_hash(tmp_path / "f", "0" * 64) == hashlib.sha256(data).hexdigest()
    assert helper.file_hash(tmp_path / "f", "0" * 40) == git_sha1(data)

    class Sibling:
        def __init__(self, rfilename, blob_id, lfs):
            self.rfilename, self.blob_id, self.lfs = rfilename, blob_id, lfs

    siblings = [Sibling("a.safetensors", "1" * 40, {"sha256": "2" * 64, "size": 3}), Sibling("config.json", "3" * 40, None)]
    assert helper.hub_hashes(siblings) == {"a.safetensors": "2" * 64, "config.json": "3" * 40}


def test_an_intact_cache_verifies_and_is_sealed(helper, tmp_path):
    folder, expected = cached_repo(tmp_path, FILES)
    result = helper.verify_cached(folder, SHA, expected)
    assert result == {"verified": sorted(FILES), "removed": [], "absent": []}
    for etag in expected.values():
        assert (folder / "blobs" / etag).stat().st_mode & 0o222 == 0  # sealed: writable by nobody


def test_a_corrupted_blob_is_removed_to_be_downloaded_again(helper, tmp_path):
    folder, expected = cached_repo(tmp_path, FILES)
    weights = folder / "blobs" / expected["model.safetensors"]
    weights.write_bytes(b"\x00weights" * 999 + b"\x00tampered")  # same name, other bytes
    config = folder / "blobs" / expected["config.json"]
    config.write_bytes(b'{"model_type": "evil"}\n')
    result = helper.verify_cached(folder, SHA, expected)
    assert result == {"verified": ["nested/tokenizer.json"], "removed": ["config.json", "model.safetensors"], "absent": []}
    assert not weights.exists() and not config.exists()
    assert not os.path.lexists(folder / "snapshots" / SHA / "model.safetensors")
    assert (folder / "snapshots" / SHA / "nested" / "tokenizer.json").read_bytes() == FILES["nested/tokenizer.json"][0]


def test_a_blob_named_other_than_the_hubs_hash_is_not_trusted(helper, tmp_path):
    """The bytes match the blob's own name, but the Hub says the file is another: not reused."""
    folder, expected = cached_repo(tmp_path, FILES)
    hub_says = dict(expected, **{"model.safetensors": hashlib.sha256(b"the new weights").hexdigest()})
    result = helper.verify_cached(folder, SHA, hub_says)
    assert result["removed"] == ["model.safetensors"] and len(result["verified"]) == 2


def test_files_absent_from_the_cache_or_the_snapshot_are_to_download(helper, tmp_path):
    folder, expected = cached_repo(tmp_path, {"config.json": FILES["config.json"]})
    result = helper.verify_cached(folder, SHA, {**expected, "model.safetensors": "4" * 64})
    assert result == {"verified": ["config.json"], "removed": [], "absent": ["model.safetensors"]}
    assert helper.verify_cached(tmp_path / "models--x--y", SHA, {"a": "5" * 40})["absent"] == ["a"]
    # A dangling snapshot link (its blob gone) is removed, not trusted.
    (folder / "blobs" / expected["config.json"]).unlink()
    assert helper.verify_cached(folder, SHA, expected)["removed"] == ["config.json"]


def test_seal_after_a_download_checks_each_blob_against_its_name(helper, tmp_path):
    folder, expected = cached_repo(tmp_path, FILES)
    assert sorted(helper.seal_snapshot(folder, SHA)["verified"]) == sorted(FILES)
    folder2, expected2 = cached_repo(tmp_path / "second", FILES)
    (folder2 / "blobs" / expected2["config.json"]).write_bytes(b"half a downl")
    assert helper.seal_snapshot(folder2, SHA)["removed"] == ["config.json"]


def test_the_free_space_of_a_capped_volume_counts_what_it_holds(helper, tmp_path):
    (tmp_path / "big").write_bytes(b"x" * (3 << 20))
    os.link(tmp_path / "big", tmp_path / "hardlink")  # counted once
    used = helper.bytes_under(str(tmp_path))
    assert 3 << 20 <= used < 4 << 20
    gib, gb = 1 << 30, 10**9  # a volume's size is the cloud's GB; what the messages say is GiB
    assert helper.cache_free(str(tmp_path), 1) == gb - used
    assert helper.cache_free(str(tmp_path), 0) > gb - used  # no cap known: statvfs alone
    assert helper.cache_free(str(tmp_path), 0.001) == 0  # fuller than its cap
    message = helper.full_cache_message("/workspace", 0, 5 * gib, "the weights")
    assert "has 0.0 GiB free" in message and "needs 5.0 GiB" in message
    assert "gpu-session cache rm" in message and "cache create --size" in message and "up --no-cache" in message


def test_the_scrub_search_reads_everything_but_sealed_blobs(helper, tmp_path):
    """A canary in an unsealed blob, in vLLM's cache or beside the venvs is found; sealed blobs are skipped."""
    import json

    folder, expected = cached_repo(tmp_path / "gpu-session" / "hub", FILES)
    helper.verify_cached(folder, SHA, expected)  # seals
    canary = "gpu-session-canary-0123456789abcdef"
    unsealed = folder / "blobs" / ("6" * 64)
    unsealed.write_bytes(b"\x00" * 5000 + canary.encode())
    (tmp_path / "gpu-session" / "vllm").mkdir()
    (tmp_path / "gpu-session" / "vllm" / "k.bin").write_bytes(b"\x00\x01" + canary.encode())
    os.link(tmp_path / "gpu-session" / "vllm" / "k.bin", tmp_path / "gpu-session" / "k-link.bin")  # read once, named twice
    out = subprocess.run(["python3", str(SEARCH), str(tmp_path)], input=canary + "\n", capture_output=True, text=True, check=True)
    said = json.loads(out.stdout)
    vllm = str(tmp_path / "gpu-session" / "vllm" / "k.bin")
    assert said["found"] == sorted([str(unsealed), vllm, str(tmp_path / "gpu-session" / "k-link.bin")])
    # The unsealed blob, k.bin, refs/main; and as root the 3 blobs' records (verified/), else the 3 blobs, unsealable.
    assert said["files_read"] == 3 + 3
    sealed_expected = 3 if os.geteuid() == 0 else 0  # sealing needs root (chown); the search wants root's blobs
    assert said["sealed_blobs_skipped"] == sealed_expected


def test_a_blob_is_hashed_once_and_again_only_when_it_changed(helper, tmp_path, monkeypatch):
    """Hash once, trust after: a sealed blob that matches its record is not read again; one whose bytes
    changed (size and mtime put back: only its ctime moved) is hashed again and removed, its record
    too; a verified/ folder that is not root's is not trusted."""
    if os.geteuid() != 0:
        pytest.skip("the records are root's: kept only as root")
    folder, expected = cached_repo(tmp_path / "gpu-session" / "hub", FILES)
    assert len(helper.verify_cached(folder, SHA, expected)["verified"]) == 3
    records = tmp_path / "gpu-session" / "verified"
    assert sorted(p.name for p in (records / folder.name).iterdir()) == sorted(expected.values())
    assert oct(records.stat().st_mode & 0o777) == "0o700"

    def hashed_again(*_):
        raise AssertionError("hashed again")

    with monkeypatch.context() as m:
        m.setattr(helper, "file_hash", hashed_again)
        assert len(helper.verify_cached(folder, SHA, expected)["verified"]) == 3  # from the records alone
        os.chown(records, 65534, 65534)  # a records folder someone else could write: no record is trusted
        with pytest.raises(AssertionError, match="hashed again"):
            helper.verify_cached(folder, SHA, expected)
        os.chown(records, 0, 0)

    weights = folder / "blobs" / expected["model.safetensors"]
    before = weights.stat()
    data = bytearray(weights.read_bytes())
    data[0] ^= 1
    weights.chmod(0o644)
    weights.write_bytes(bytes(data))
    weights.chmod(0o444)
    os.utime(weights, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert weights.stat().st_size == before.st_size and weights.stat().st_mtime_ns == before.st_mtime_ns
    result = helper.verify_cached(folder, SHA, expected)
    assert result["removed"] == ["model.safetensors"] and not weights.exists()
    assert not (records / folder.name / expected["model.safetensors"]).exists()


def test_seal_never_reaches_a_file_of_the_host_through_a_link(helper, tmp_path):
    """The session's user writes the Hub cache: a symbolic link or a hard link it put in a blob's place
    must not hand a file of the host to root's chown and chmod (a link is not followed; a file with
    another name is left as it is, when root seals). A regular blob is sealed."""
    blobs = tmp_path / "blobs"
    blobs.mkdir()
    linked, hard_linked = tmp_path / "shadow", tmp_path / "passwd"
    for host_file in (linked, hard_linked):
        host_file.write_text("secret")
        host_file.chmod(0o600)
    (blobs / "soft").symlink_to(linked)
    os.link(hard_linked, blobs / "hard")
    (blobs / "plain").write_text("weights")
    for name in ("soft", "hard", "plain"):
        helper.seal(blobs / name)
    assert oct(linked.stat().st_mode & 0o777) == "0o600"  # whoever runs it: a link is never followed
    if os.geteuid() == 0:
        assert oct(hard_linked.stat().st_mode & 0o777) == "0o600"
    assert oct((blobs / "plain").stat().st_mode & 0o777) == "0o444"


def test_root_writes_and_removes_in_the_hub_cache_only_through_real_folders(helper, tmp_path):
    """The check (root, with a cache volume) writes a revision's ref and removes what does not
    verify: a link the session's user planted at the ref is replaced, not written through; a
    snapshot folder swapped for a link leads no removal elsewhere."""
    hub = tmp_path / "hub"
    folder, _ = cached_repo(hub, FILES)
    victim = tmp_path / "victim"
    victim.write_text("keep")
    (folder / "refs" / "main").unlink()
    (folder / "refs" / "main").symlink_to(victim)
    helper.write_ref(folder, "main", "b" * 40)
    assert victim.read_text() == "keep"
    assert not (folder / "refs" / "main").is_symlink() and (folder / "refs" / "main").read_text() == "b" * 40
    helper.write_ref(folder, "refs/pr/1", "c" * 40)  # a revision with folders of its own
    assert (folder / "refs" / "refs" / "pr" / "1").read_text() == "c" * 40

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "config.json").write_text("keep")
    snapshot = folder / "snapshots" / SHA
    snapshot.rename(tmp_path / "moved")
    snapshot.symlink_to(elsewhere)
    helper.remove_in(hub, f"{folder.name}/snapshots/{SHA}/config.json")
    assert (elsewhere / "config.json").read_text() == "keep"
    helper.remove_in(hub, f"{folder.name}/blobs/{git_sha1(FILES['config.json'][0])}")  # a real folder: removed
    assert not (folder / "blobs" / git_sha1(FILES["config.json"][0])).exists()
