import json

import pytest
import torch

from core import io
from core.weights import latest_checkpoint, load_state, load_weights, save_checkpoint


def test_atomic_write_leaves_nothing_on_failure(tmp_path):
    dest = tmp_path / "a.json"
    io.write_json(dest, {"x": 1})
    with pytest.raises(RuntimeError):
        with io.atomic_path(dest) as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed")
    assert json.loads(dest.read_text()) == {"x": 1} and list(tmp_path.iterdir()) == [dest]


def test_checkpoints_are_complete_units(tmp_path):
    weights = {"w": torch.arange(4.0)}
    for epoch in (1, 2, 3):
        save_checkpoint(tmp_path, epoch, weights, {"epoch": epoch}, {"epoch": str(epoch)}, keep=2)
    (tmp_path / ".epoch-0004.half").mkdir()  # a killed save leaves only a hidden temp dir
    latest = latest_checkpoint(tmp_path)
    assert latest.name == "epoch-0003" and sorted(p.name for p in tmp_path.glob("epoch-*")) == ["epoch-0002", "epoch-0003"]
    assert load_state(latest / "state.pt") == {"epoch": 3}
    assert torch.equal(load_weights(latest / "model.safetensors")["w"], weights["w"])


def test_torn_jsonl_line_is_skipped(tmp_path):
    path = tmp_path / "m.jsonl"
    io.append_jsonl(path, {"epoch": 1})
    with open(path, "a") as f:
        f.write('{"epoch": 2, "va')
    assert io.read_jsonl(path) == [{"epoch": 1}]
