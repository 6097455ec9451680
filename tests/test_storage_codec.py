"""The compact storage codec: exact round trips, smaller files, and clear refusals of bad files."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import toast_core.storage.storage_codec as codec
from toast_core.core.backbone import tiny_fixture_backbone
from toast_core.methods import build_method
from toast_core.storage.checkpoints import CheckpointError, load_module, save_module


def _state() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "qkv": torch.randn(576, 192, generator=g) * 0.05,
        "patch": torch.randn(192, 3, 16, 16, generator=g),
        "bias": torch.randn(192, generator=g),
        "pos": torch.randn(1, 197, 192, generator=g),
        "zero_rows": torch.zeros(64, 512),
        "index": torch.arange(7),
    }


def test_int8_rows_quantises_large_matrices_and_keeps_the_rest_close():
    state = _state()
    stored = codec.encode(state, "int8-rows")
    assert stored["qkv"].dtype == torch.int8 and stored["patch"].dtype == torch.int8
    assert stored["bias"].dtype == torch.float16 and stored["pos"].dtype == torch.float16
    assert torch.equal(stored["index"], state["index"])
    decoded = codec.decode(stored, "int8-rows", state)
    for name in ("qkv", "patch"):
        rows = state[name].reshape(state[name].shape[0], -1)
        err = (decoded[name] - state[name]).reshape_as(rows).abs().amax(dim=1)
        # half a quantisation step per row, with the scale's 8-bit rounding
        assert torch.all(err <= rows.abs().amax(dim=1) / 127 * 0.51)
    assert torch.equal(decoded["zero_rows"], state["zero_rows"])
    assert all(decoded[k].dtype == state[k].dtype for k in state)


@pytest.mark.parametrize("name", ["float32", "float16", "int8-rows"])
def test_re_encoding_a_decoded_state_is_bit_identical(name):
    state = _state()
    first = codec.encode(state, name)
    again = codec.encode(codec.decode(first, name, state), name)
    assert first.keys() == again.keys()
    assert all(torch.equal(first[k], again[k]) for k in first)


def test_unknown_codec_is_refused():
    with pytest.raises(codec.CodecError, match="Unknown storage codec"):
        codec.encode(_state(), "zip")


def _compact_module(tmp_path, monkeypatch):
    monkeypatch.setattr(codec, "_MIN_NUMEL", 64)
    monkeypatch.setattr(codec, "_MIN_ROWS", 4)
    backbone = tiny_fixture_backbone()
    full = build_method("full", backbone, 3)
    plain = save_module(full, tmp_path / "plain", task="t")
    compact = save_module(full, tmp_path / "compact", task="t", storage="int8-rows")
    return backbone, plain, compact


def test_a_compact_checkpoint_is_smaller_and_loads_what_was_encoded(tmp_path, monkeypatch):
    backbone, plain, compact = _compact_module(tmp_path, monkeypatch)
    size = lambda card: card.with_suffix(".safetensors").stat().st_size  # noqa: E731
    assert size(compact) < 0.5 * size(plain)
    assert json.loads(compact.read_text())["storage"] == "int8-rows"
    own = build_method("full", backbone, 3).state_dict()
    expected = codec.decode(load_file(str(compact.with_suffix(".safetensors"))), "int8-rows", own)
    loaded = load_module(compact, backbone).state_dict()
    assert all(torch.equal(loaded[k], expected[k]) for k in loaded)


def _rewrite(card_path, tensors):
    """Replace a checkpoint's tensors and re-stamp the card's hash (a well-formed but wrong file)."""
    from toast_core.storage.checkpoints import _sha256

    weights = card_path.with_suffix(".safetensors")
    save_file(tensors, str(weights))
    card = json.loads(card_path.read_text())
    card["weights_sha256"] = _sha256(weights)
    card_path.write_text(json.dumps(card))


def test_int8_tensors_without_scales_or_with_wrong_scales_are_refused(tmp_path, monkeypatch):
    backbone, _, compact = _compact_module(tmp_path, monkeypatch)
    stored = load_file(str(compact.with_suffix(".safetensors")))
    quantised = next(k for k, v in stored.items() if v.dtype == torch.int8)
    bad = dict(stored)
    del bad[quantised + codec.SCALE_SUFFIX]
    _rewrite(compact, bad)
    with pytest.raises(CheckpointError, match="no row scales"):
        load_module(compact, backbone)
    bad = dict(stored)
    bad[quantised + codec.SCALE_SUFFIX] = torch.ones(2)
    _rewrite(compact, bad)
    with pytest.raises(CheckpointError, match="one scale per row"):
        load_module(compact, backbone)


def test_a_card_naming_an_unknown_codec_is_refused(tmp_path, monkeypatch):
    backbone, _, compact = _compact_module(tmp_path, monkeypatch)
    card = json.loads(compact.read_text())
    card["storage"] = "zip"
    compact.write_text(json.dumps(card))
    with pytest.raises(CheckpointError, match="Unknown storage codec"):
        load_module(compact, backbone)
