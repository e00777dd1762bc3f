import json
import os
from pathlib import Path

import pytest
import torch

from core import io
from core.io import IntegrityError
from core.weights import check_checkpoint, latest_checkpoint, load_weights, save_checkpoint, save_weights


def test_atomic_write_leaves_nothing_on_failure(tmp_path):
    dest = tmp_path / "a.json"
    io.write_json(dest, {"x": 1})
    with pytest.raises(RuntimeError):
        with io.atomic_path(dest) as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed")
    assert json.loads(dest.read_text()) == {"x": 1} and list(tmp_path.iterdir()) == [dest]


def test_a_temp_file_that_cannot_be_made_is_named_by_its_destination(tmp_path, monkeypatch):
    """A folder that takes no new file (/proc, a read-only mount): the error named the temp file
    (".x.npz.nlt06kyu.tmp"), a name the user never gave."""
    def refused(*args, **kwargs):
        raise FileNotFoundError(2, "No such file or directory", str(tmp_path / ".x.npz.abcdefgh.tmp"))

    monkeypatch.setattr(io.tempfile, "mkstemp", refused)
    with pytest.raises(FileNotFoundError) as error:
        io.write_bytes(tmp_path / "x.npz", b"")
    assert error.value.filename == str(tmp_path / "x.npz")



@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="names the synced files through /proc")
def test_a_rename_is_made_durable_by_syncing_its_directory(tmp_path, monkeypatch):
    """The file's contents are synced before the rename and its directory after it, for atomic
    files and for checkpoint directories alike."""
    synced, fsync = [], os.fsync

    def recording(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        fsync(fd)

    monkeypatch.setattr(os, "fsync", recording)
    dest = tmp_path / "a.json"
    io.write_json(dest, {"x": 1})
    assert Path(synced[0]).name.startswith(".a.json.") and synced[-1] == str(tmp_path), synced
    synced.clear()
    final = save_checkpoint(tmp_path / "ckpt", epoch=1, weights={"w": torch.ones(2)}, state={}, metadata={})
    assert synced[-1] == str(final.parent) and final.is_dir(), synced


def test_check_sha256_returns_the_digest_or_names_the_record_and_the_fix(tmp_path):
    path = tmp_path / "w.bin"
    path.write_bytes(b"abc")
    digest = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"   # sha256("abc"), FIPS 180-2
    assert io.check_sha256(path, digest, record="r", fix="f") == digest
    path.write_bytes(b"abd")
    with pytest.raises(IntegrityError, match=rf"^{path} differs from the sha256 its run recorded \(ba7816bf8f01, "
                                             rf"now [0-9a-f]{{12}}\): train it again$"):
        io.check_sha256(path, digest, record="its run recorded", fix="train it again")
    with pytest.raises(FileNotFoundError, match="does not exist"):   # not the sha256 of nothing
        io.check_sha256(tmp_path / "gone.bin", digest, record="r", fix="f")


def tree(root, files: dict[str, bytes]):
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    return root


def test_a_directory_digest_sets_every_name_and_content_apart(tmp_path):
    import hashlib

    # without lengths, a's contents "X" + "b\0Y" hash as the pair a = "X", b = "Y" (the scheme before v2)
    one = tree(tmp_path / "one", {"a": b"Xb\0Y"})
    two = tree(tmp_path / "two", {"a": b"X", "b": b"Y"})
    assert io.tree_sha256_v1(one) == io.tree_sha256_v1(two)
    assert io.sha256(one) != io.sha256(two)
    # v2 by hand: the scheme's tag, then per file (sorted) its name's length, name, size, contents
    expected = hashlib.sha256(b"densekit tree sha256 v2\0"
                              + (1).to_bytes(8, "little") + b"a" + (1).to_bytes(8, "little") + b"X"
                              + (1).to_bytes(8, "little") + b"b" + (1).to_bytes(8, "little") + b"Y").hexdigest()
    assert io.sha256(two) == expected
    assert io.sha256(tmp_path / "two" / "a") == hashlib.sha256(b"X").hexdigest()   # a file: plain sha256sum


def test_a_directory_recorded_in_the_first_scheme_still_verifies_and_a_changed_one_does_not(tmp_path):
    package = tree(tmp_path / "m.mlpackage", {"Manifest.json": b"{}", "Data/weights.bin": b"\1\2\3"})
    old_record = io.tree_sha256_v1(package)
    assert io.check_sha256(package, old_record, record="r", fix="f") == io.sha256(package)
    assert io.matches_record(package, io.sha256(package))
    (package / "Data" / "weights.bin").write_bytes(b"\1\2\4")
    for record in (old_record, "0" * 64):   # the refusal shows the tree's digest in both schemes
        with pytest.raises(IntegrityError, match="differs from the sha256 r") as refused:
            io.check_sha256(package, record, record="r", fix="f")
        assert f"now {io.sha256(package)[:12]}; {io.tree_sha256_v1(package)[:12]} in the first scheme" in str(refused.value)
    (tmp_path / "f.bin").write_bytes(b"x")   # a file is never checked against the directory scheme
    assert not io.matches_record(tmp_path / "f.bin", io.tree_sha256_v1(tmp_path / "f.bin"))


def test_a_directory_digest_orders_its_files_by_path_parts_case_sensitively(tmp_path):
    import hashlib

    # byte order of each part ("B" < "a", "a" < "a-c" < "a.bin"): the same on every OS
    root = tree(tmp_path / "t", {"a/b": b"1", "a-c": b"2", "B.bin": b"3", "a.bin": b"4"})
    assert [f.relative_to(root).as_posix() for f in io.tree_files(root)] == ["B.bin", "a/b", "a-c", "a.bin"]
    expected = hashlib.sha256(b"densekit tree sha256 v2\0")
    for name, data in (("B.bin", b"3"), ("a/b", b"1"), ("a-c", b"2"), ("a.bin", b"4")):
        expected.update(len(name).to_bytes(8, "little") + name.encode() + (1).to_bytes(8, "little") + data)
    assert io.sha256(root) == expected.hexdigest()


def test_an_empty_directory_never_passes_for_an_empty_file(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty.bin").write_bytes(b"")
    assert not io.matches_record(tmp_path / "empty", io.sha256(tmp_path / "empty.bin"))


def test_the_same_weights_and_metadata_always_make_the_same_file(tmp_path):
    from safetensors import safe_open

    weights = {"w": torch.arange(6.0).reshape(2, 3), "b": torch.ones(2, dtype=torch.float16)}
    metadata = {"format": "densekit-student", "config": "{}", "epoch": "3", "val": '{"abs_rel": 0.2}'}
    digests = set()
    for i in range(12):   # safetensors alone wrote the metadata in a new order most times
        save_weights(tmp_path / f"{i}.safetensors", weights, metadata)
        digests.add(io.sha256(tmp_path / f"{i}.safetensors"))
    assert len(digests) == 1
    loaded = load_weights(tmp_path / "0.safetensors")
    assert loaded.keys() == weights.keys() and all(torch.equal(loaded[k], weights[k]) for k in weights)
    assert loaded["b"].dtype == torch.float16
    with safe_open(str(tmp_path / "0.safetensors"), "pt") as f:
        assert f.metadata() == metadata
    assert int.from_bytes((tmp_path / "0.safetensors").read_bytes()[:8], "little") % 8 == 0   # the writer's padding


def test_checkpoints_are_complete_units(tmp_path):
    weights = {"w": torch.arange(4.0)}
    for epoch in (1, 2, 3):
        save_checkpoint(tmp_path, epoch, weights, {"epoch": epoch}, {"epoch": str(epoch)}, keep=2)
    (tmp_path / ".epoch-0004.half").mkdir()  # a killed save leaves only a hidden temp dir
    latest = latest_checkpoint(tmp_path)
    assert latest.name == "epoch-0003" and sorted(p.name for p in tmp_path.glob("epoch-*")) == ["epoch-0002", "epoch-0003"]
    assert check_checkpoint(latest) == {"epoch": 3}
    assert torch.equal(load_weights(latest / "model.safetensors")["w"], weights["w"])


def test_torn_jsonl_line_is_skipped(tmp_path):
    path = tmp_path / "m.jsonl"
    io.append_jsonl(path, {"epoch": 1})
    with open(path, "a") as f:
        f.write('{"epoch": 2, "va')
    assert io.read_jsonl(path) == [{"epoch": 1}]


def test_a_checkpoint_whose_weights_changed_is_refused_by_name(tmp_path):
    save_checkpoint(tmp_path, 1, {"w": torch.arange(64.0)}, {"epoch": 1}, {})
    weights = latest_checkpoint(tmp_path) / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-5] ^= 0x40    # a flipped bit in the tensor data: the file still loads
    weights.write_bytes(bytes(data))
    assert load_weights(weights)["w"].shape == (64,)
    with pytest.raises(IntegrityError, match=rf"{weights}.* differs from the sha256 its checkpoint recorded"):
        check_checkpoint(weights.parent)


def test_truncated_weights_and_state_name_the_file(tmp_path):
    save_weights(tmp_path / "w.safetensors", {"w": torch.zeros(16)})
    data = (tmp_path / "w.safetensors").read_bytes()
    (tmp_path / "w.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(IntegrityError, match=r"w\.safetensors cannot be read as safetensors weights.*truncated or corrupt"):
        load_weights(tmp_path / "w.safetensors")
    save_checkpoint(tmp_path / "ckpt", 1, {"w": torch.zeros(4)}, {"epoch": 1}, {})
    state = latest_checkpoint(tmp_path / "ckpt") / "state.pt"
    state.write_bytes(state.read_bytes()[:20])
    with pytest.raises(IntegrityError, match=r"state\.pt cannot be read .*truncated or corrupt"):
        check_checkpoint(state.parent)


def test_an_export_directory_vouches_only_for_the_files_its_manifest_lists(tmp_path):
    """An unlisted file beside a manifest.json would otherwise run unchecked; a name in another case
    (MODEL.TFLITE opens model.tflite on macOS) is checked against its record; an entry without a
    64-digit sha256 is refused as a damaged manifest, not a crash."""
    from core.manifest import IntegrityError, verify_artefact, verify_command_arguments

    (tmp_path / "model.tflite").write_bytes(b"the artefact")
    entry = {"path": "model.tflite", "sha256": io.sha256(tmp_path / "model.tflite")}
    (tmp_path / "manifest.json").write_text(json.dumps({"artefacts": [entry]}))
    assert verify_artefact(tmp_path / "model.tflite")
    (tmp_path / "MODEL.TFLITE").write_bytes(b"the artefact")
    assert verify_artefact(tmp_path / "MODEL.TFLITE")
    (tmp_path / "MODEL.TFLITE").write_bytes(b"another file")
    with pytest.raises(IntegrityError, match="differs from the sha256 recorded in"):
        verify_artefact(tmp_path / "MODEL.TFLITE")
    (tmp_path / "other.tflite").write_bytes(b"dropped in later")
    with pytest.raises(IntegrityError, match=r"other.tflite is not listed in .*run the export's own files "
                                             r"\(model.tflite\).*pass verify=False"):
        verify_artefact(tmp_path / "other.tflite")   # the API's keyword; the commands name their flag
    with pytest.raises(IntegrityError, match=r"other.tflite is not listed in .*pass --no-verify"):
        verify_command_arguments([tmp_path / "other.tflite", tmp_path / "missing.tflite"])
    verify_command_arguments([tmp_path / "missing.tflite"])   # left to the command's own check, which names it
    (tmp_path / "model.pt").write_bytes(b"no artefact")
    verify_command_arguments([tmp_path / "model.pt"])         # so is a file that is no artefact
    assert not verify_artefact(tmp_path.parent / "outside.tflite")   # no manifest: nothing recorded
    from core.manifest import verify_export   # python -m quant.verify names what edge.run would refuse
    assert verify_export(tmp_path) == ["MODEL.TFLITE: sha256 differs from the manifest's model.tflite",
                                       "other.tflite: not in the manifest (nothing recorded vouches for it)"]
    (tmp_path / "manifest.json").write_text(json.dumps({"artefacts": [entry, {"path": "x.onnx", "sha256": None}]}))
    with pytest.raises(IntegrityError, match="manifest.json is missing or unreadable .*re-export"):
        verify_artefact(tmp_path / "model.tflite")
    # a hand-edited entry that points outside the export would be checked and run as one of its files
    (tmp_path / "manifest.json").write_text(json.dumps({"artefacts": [entry, {**entry, "path": "../outside.tflite"}]}))
    with pytest.raises(IntegrityError, match=r"\(ValueError: the artefact path '../outside.tflite' is not a file name"):
        verify_export(tmp_path)
    (tmp_path / "manifest.json").write_text("{}")   # said as such, not as KeyError: 'artefacts'
    with pytest.raises(IntegrityError, match=r"\(ValueError: no list of artefacts\)"):
        verify_export(tmp_path)


def test_checkpoints_and_atomic_files_get_the_modes_the_umask_allows(tmp_path):
    """mkdtemp (0700) and mkstemp (0600) would keep a run's checkpoints and files from the group
    that resumes or reads it."""
    import os
    import stat

    previous = os.umask(0o022)
    try:
        io.UMASK, saved = 0o022, io.UMASK
        final = save_checkpoint(tmp_path / "ckpt", 1, {"w": torch.zeros(2)}, {"epoch": 1}, {})
        with io.atomic_path(tmp_path / "file.json") as tmp:
            tmp.write_text("{}")
    finally:
        io.UMASK = saved
        os.umask(previous)
    assert stat.S_IMODE(final.stat().st_mode) == 0o755
    assert stat.S_IMODE((tmp_path / "file.json").stat().st_mode) == 0o644


def test_a_nearly_full_disk_renames_write_errors_only(tmp_path, monkeypatch):
    """Under 1 MiB free, a writer's own words for a full disk (torch.save's RuntimeError) become
    ENOSPC; a refusal raised while writing (a ValueError) is not a disk problem and keeps its words."""
    import errno

    from core import io

    monkeypatch.setattr(io, "out_of_space", lambda directory, margin=1 << 20: True)
    with pytest.raises(OSError) as caught:
        with io.atomic_path(tmp_path / "a.bin"):
            raise RuntimeError("unexpected pos 64 vs 0")
    assert caught.value.errno == errno.ENOSPC
    with pytest.raises(ValueError, match="the digest differs"):
        with io.atomic_path(tmp_path / "b.bin"):
            raise ValueError("the digest differs")
    assert not any(tmp_path.iterdir())


def test_numpy_numbers_are_written_as_numbers(tmp_path):
    """A numpy scalar or array in a record reads back as numbers, not as the strings str() made."""
    import numpy as np

    record = {"f": np.float32(0.5), "i": np.int64(3), "b": np.bool_(True), "a": np.arange(2), "p": tmp_path}
    io.write_json(tmp_path / "r.json", record)
    io.append_jsonl(tmp_path / "r.jsonl", record)
    want = {"f": 0.5, "i": 3, "b": True, "a": [0, 1], "p": str(tmp_path)}
    assert io.read_json(tmp_path / "r.json", fix="") == want and io.read_jsonl(tmp_path / "r.jsonl") == [want]


def test_checkpoints_are_ordered_by_epoch_number_not_by_name(tmp_path):
    """By name, epoch-10000 sorts before epoch-9999: the newest would be pruned as it is saved."""
    weights = {"w": torch.zeros(1)}
    for epoch in (9999, 10000):
        save_checkpoint(tmp_path, epoch, weights, {"epoch": epoch}, {})
    assert [p.name for p in tmp_path.glob("epoch-*")] == ["epoch-10000"]
    assert check_checkpoint(latest_checkpoint(tmp_path)) == {"epoch": 10000}
    with pytest.raises(ValueError, match="keep=0"):
        save_checkpoint(tmp_path, 10001, weights, {"epoch": 10001}, {}, keep=0)


def test_a_nearly_full_disk_keeps_an_unrelated_error_in_its_own_words(tmp_path, monkeypatch):
    """A missing source file copied on a full disk is still a missing file, not "no space left"."""
    import shutil

    monkeypatch.setattr(io, "out_of_space", lambda directory, margin=1 << 20: True)
    with pytest.raises(FileNotFoundError):
        with io.atomic_path(tmp_path / "out.tflite") as tmp:
            shutil.copyfile(tmp_path / "missing.tflite", tmp)


def test_a_long_file_name_is_written_as_a_plain_write_would_be(tmp_path):
    """The temp name adds ~14 characters to the target's: a 245-character name must still work."""
    name = "a" * 241 + ".png"
    io.write_text(tmp_path / name, "x")
    assert [p.name for p in tmp_path.iterdir()] == [name]


def test_home_path_is_the_shells_rule_for_a_leading_tilde(tmp_path, monkeypatch):
    """Path.expanduser raised RuntimeError for "~draft" (no such user): a file or run of that name
    failed as an internal error wherever a path was read."""
    from core.io import home_path
    from distill.training.runs import find_run

    monkeypatch.setenv("HOME", str(tmp_path))
    assert home_path("~/runs") == tmp_path / "runs" and home_path(Path("~draft")) == Path("~draft")
    assert home_path("a/~/b") == Path("a/~/b")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "~draft").mkdir()
    (tmp_path / "~draft" / "config.json").write_text('{"name": "v3"}')
    assert find_run("~draft") == Path("~draft")


def test_a_result_file_is_refused_where_it_would_replace_an_input_or_a_read_only_file(tmp_path):
    """The atomic rename replaces any file, read-only or read by the command, so both are refused
    before the work; a writable result file of its own is replaced as asked."""
    model, result = tmp_path / "model.tflite", tmp_path / "bench.json"
    model.write_bytes(b"x")
    with pytest.raises(ValueError, match=r"--json .*model.tflite: the result is JSON; give a file name ending in .json"):
        io.check_output_file(model, "--json")
    reads = tmp_path / "manifest.json"
    reads.write_text("{}")
    with pytest.raises(ValueError, match="is a file this command reads"):
        io.check_output_file(reads, "--json", reads=[model, reads])
    result.write_text("{}")
    io.check_output_file(result, "--json", reads=[model])
    result.chmod(0o444)
    with pytest.raises(ValueError, match=rf"--json {result} is read-only, kept from being replaced; make it "
                                         rf"writable \(chmod u\+w {result}\) or give another file name"):
        io.check_output_file(result, "--json")
    assert result.read_text() == "{}"
