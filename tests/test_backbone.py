"""Backbone loading: every source (fixture, embedded, local file, hub cache, hub offline) and every
way a load can go wrong, each with a message that says what to do instead."""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file
from timm.models.vision_transformer import VisionTransformer

from toast_core.core import backbone as bb
from toast_core.core.backbone import (
    Backbone,
    BackboneError,
    load_backbone,
    load_embedded,
    tiny_fixture_backbone,
    token_layout,
    weights_hash,
)

ARCH = "vit_tiny_patch16_224"
TINY = {"img_size": 32, "depth": 2}  # vit_tiny width (192) and heads (3), but 2 blocks at 32 px


class _Payload:
    """Unpickling this would run `touch <marker>`: a stand-in for a malicious checkpoint."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


def _tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def source_vit() -> VisionTransformer:
    """A tiny vit_tiny-shaped model WITH a classifier head, as a downloaded checkpoint would have."""
    torch.manual_seed(3)
    return timm.create_model(ARCH, pretrained=False, num_classes=10, **TINY).eval()


@pytest.fixture(scope="module")
def safetensors_file(tmp_path_factory: pytest.TempPathFactory, source_vit: VisionTransformer) -> Path:
    path = tmp_path_factory.mktemp("weights") / "tiny.safetensors"
    save_file(_tensors(source_vit), str(path))
    return path


def _assert_backbone_equals_source(bk: Backbone, source: VisionTransformer) -> None:
    own = bk.model.state_dict()
    src = source.state_dict()
    assert not any(k.startswith("head") for k in own), "the classifier head must be dropped"
    assert set(own) == {k for k in src if not k.startswith("head")}
    for k, v in own.items():
        assert torch.equal(v, src[k]), k


# --- fixture backbone and layout ----------------------------------------------------------------


def test_fixture_backbone_is_frozen(fixture_backbone: Backbone) -> None:
    model = fixture_backbone.model
    assert not model.training
    assert all(not m.training for m in model.modules())
    assert all(not p.requires_grad for p in model.parameters())
    assert fixture_backbone.source == "fixture"
    assert fixture_backbone.device == torch.device("cpu")


def test_fixture_layout(fixture_backbone: Backbone) -> None:
    lay = fixture_backbone.layout
    assert lay.num_prefix_tokens == 1 and lay.has_cls
    assert lay.num_dist_tokens == 0 and lay.num_reg_tokens == 0
    assert lay.grid == (4, 4) and lay.num_patches == 16
    assert lay.patch_size == (8, 8) and lay.img_size == (32, 32)
    assert (lay.embed_dim, lay.depth, lay.num_heads) == (32, 2, 2)
    assert lay.global_pool == "token" and not lay.dynamic_img_size
    assert len(lay.mean) == 3 and len(lay.std) == 3
    desc = fixture_backbone.describe()
    assert desc["parameters"] == sum(p.numel() for p in fixture_backbone.model.parameters())
    assert desc["weights_hash"] == fixture_backbone.weights_hash and desc["grid"] == (4, 4)


def test_layout_register_tokens_non_square_and_no_cls() -> None:
    reg = tiny_fixture_backbone(reg_tokens=4).layout
    assert (reg.num_prefix_tokens, reg.num_reg_tokens, reg.num_dist_tokens, reg.has_cls) == (5, 4, 0, True)
    wide = tiny_fixture_backbone(img_size=(32, 48)).layout
    assert wide.grid == (4, 6) and wide.img_size == (32, 48) and wide.num_patches == 24
    avg = tiny_fixture_backbone(class_token=False, global_pool="avg").layout
    assert (avg.num_prefix_tokens, avg.has_cls, avg.global_pool) == (0, False, "avg")
    dyn = tiny_fixture_backbone(dynamic_img_size=True).layout
    assert dyn.dynamic_img_size


def test_layout_distilled_token() -> None:
    model = timm.create_model("deit_tiny_distilled_patch16_224", pretrained=False, **TINY)
    lay = token_layout(model)
    assert (lay.num_prefix_tokens, lay.has_cls, lay.num_dist_tokens, lay.num_reg_tokens) == (2, True, 1, 0)
    assert lay.grid == (2, 2) and lay.patch_size == (16, 16)
    assert lay.mean == pytest.approx((0.485, 0.456, 0.406))  # the model's own normalisation, not a guess


def test_token_layout_refuses_non_vit() -> None:
    with pytest.raises(BackboneError, match="Only timm VisionTransformer"):
        token_layout(torch.nn.Linear(2, 2))  # type: ignore[arg-type]


# --- weights hash ----------------------------------------------------------------------------------


def test_weights_hash_stable_and_sensitive() -> None:
    a = tiny_fixture_backbone(seed=0)
    b = tiny_fixture_backbone(seed=0)
    assert a.weights_hash == b.weights_hash == weights_hash(a.model)
    assert len(a.weights_hash) == 16
    assert tiny_fixture_backbone(seed=1).weights_hash != a.weights_hash
    changed = copy.deepcopy(a.model)
    with torch.no_grad():
        changed.blocks[1].mlp.fc2.weight[0, 0] += 1e-3
    assert weights_hash(changed) != a.weights_hash
    assert weights_hash(a.model) == a.weights_hash  # the copy did not touch the original


# --- local files -----------------------------------------------------------------------------------


def test_load_safetensors_file(safetensors_file: Path, source_vit: VisionTransformer) -> None:
    bk = load_backbone(ARCH, weights=safetensors_file, model_kwargs=TINY, device="cpu")
    assert bk.source == "file" and bk.name == f"{ARCH}:tiny.safetensors"
    assert bk.layout.grid == (2, 2) and bk.layout.depth == 2 and bk.layout.embed_dim == 192
    assert not bk.model.training and not any(p.requires_grad for p in bk.model.parameters())
    _assert_backbone_equals_source(bk, source_vit)
    again = load_backbone(ARCH, weights=safetensors_file, model_kwargs=TINY, device="cpu")
    assert again.weights_hash == bk.weights_hash


def test_load_pth_file_same_hash(
    tmp_path: Path, safetensors_file: Path, source_vit: VisionTransformer
) -> None:
    pth = tmp_path / "tiny.pth"
    torch.save(_tensors(source_vit), pth)
    from_pth = load_backbone(ARCH, weights=pth, model_kwargs=TINY, device="cpu")
    _assert_backbone_equals_source(from_pth, source_vit)
    from_st = load_backbone(ARCH, weights=safetensors_file, model_kwargs=TINY, device="cpu")
    assert from_pth.weights_hash == from_st.weights_hash


def test_load_wrapped_state_dict(tmp_path: Path, source_vit: VisionTransformer) -> None:
    """Training scripts save {'model': ...} or DDP 'module.' prefixes; both are plain tensors."""
    path = tmp_path / "wrapped.pt"
    torch.save({"model": {f"module.{k}": v for k, v in _tensors(source_vit).items()}}, path)
    bk = load_backbone(ARCH, weights=path, model_kwargs=TINY, device="cpu")
    _assert_backbone_equals_source(bk, source_vit)


def test_mismatched_width_lists_shapes(tmp_path: Path) -> None:
    narrow = timm.create_model(ARCH, pretrained=False, embed_dim=96, num_heads=3, **TINY)
    path = tmp_path / "narrow.safetensors"
    save_file(_tensors(narrow), str(path))
    with pytest.raises(BackboneError) as err:
        load_backbone(ARCH, weights=path, model_kwargs=TINY)
    msg = str(err.value)
    assert "do not match" in msg and "Shape mismatches" in msg and "narrow.safetensors" in msg
    assert "blocks.0.attn.proj.weight: file (96, 96) vs model (192, 192)" in msg


def test_missing_and_unexpected_keys_listed(tmp_path: Path, source_vit: VisionTransformer) -> None:
    state = _tensors(source_vit)
    del state["blocks.1.mlp.fc2.weight"]
    state["blocks.1.extra.weight"] = torch.zeros(3)
    path = tmp_path / "edited.safetensors"
    save_file(state, str(path))
    with pytest.raises(BackboneError) as err:
        load_backbone(ARCH, weights=path, model_kwargs=TINY)
    msg = str(err.value)
    assert "Missing keys (1): blocks.1.mlp.fc2.weight" in msg
    assert "Unexpected keys (1): blocks.1.extra.weight" in msg


def test_deeper_file_reports_extra_blocks(tmp_path: Path) -> None:
    deeper = timm.create_model(ARCH, pretrained=False, img_size=32, depth=3)
    path = tmp_path / "deeper.safetensors"
    save_file(_tensors(deeper), str(path))
    with pytest.raises(BackboneError, match=r"Unexpected keys \(\d+\): blocks\.2\."):
        load_backbone(ARCH, weights=path, model_kwargs=TINY)


def test_pickled_object_refused_and_never_run(tmp_path: Path) -> None:
    marker = tmp_path / "code-ran"
    path = tmp_path / "evil.pth"
    torch.save({"blocks.0.norm1.weight": torch.ones(2), "payload": _Payload(marker)}, path)
    with pytest.raises(BackboneError) as err:
        load_backbone(ARCH, weights=path, model_kwargs=TINY)
    msg = str(err.value)
    assert "Refused" in msg and "pickled Python objects" in msg and "evil.pth" in msg
    assert "safetensors" in msg
    assert "weights_only` set to `False`" not in msg  # never advise turning the safety off
    assert not marker.exists(), "the pickled payload was executed"


def test_non_tensor_values_refused(tmp_path: Path) -> None:
    path = tmp_path / "numbers.pth"
    torch.save({"epoch": 3, "lr": 0.1}, path)  # allowed by weights_only, but not weights
    with pytest.raises(BackboneError, match="does not hold a state dict of tensors"):
        load_backbone(ARCH, weights=path, model_kwargs=TINY)


def test_text_renamed_safetensors(tmp_path: Path) -> None:
    path = tmp_path / "page.safetensors"
    path.write_text("<html>Sign in to download</html>\n")
    with pytest.raises(BackboneError, match="'page.safetensors' is not a valid safetensors file"):
        load_backbone(ARCH, weights=path, model_kwargs=TINY)


def test_text_renamed_pth(tmp_path: Path) -> None:
    path = tmp_path / "notes.pth"
    path.write_text("just some notes\n")
    with pytest.raises(BackboneError, match="Could not read 'notes.pth' as a torch weights file"):
        load_backbone(ARCH, weights=path, model_kwargs=TINY)


def test_unknown_suffix(tmp_path: Path) -> None:
    path = tmp_path / "weights.npz"
    path.write_bytes(b"\x00" * 16)
    with pytest.raises(BackboneError, match=r"Unsupported weights file 'weights.npz'.*\.safetensors"):
        load_backbone(ARCH, weights=path, model_kwargs=TINY)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(BackboneError, match="does not exist"):
        load_backbone(ARCH, weights=tmp_path / "nope.safetensors")


def test_file_with_unknown_arch(safetensors_file: Path) -> None:
    with pytest.raises(BackboneError, match="'vit_banana_patch3' is not a timm architecture"):
        load_backbone("vit_banana_patch3", weights=safetensors_file)


def test_file_with_non_vit_arch(safetensors_file: Path) -> None:
    with pytest.raises(BackboneError, match="'resnet18' is a ResNet, not a ViT"):
        load_backbone("resnet18", weights=safetensors_file)


# --- hub ---------------------------------------------------------------------------------------------


@pytest.fixture
def empty_hub_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty Hugging Face cache, so a real cached download on the machine cannot mask the probe."""
    from huggingface_hub import constants

    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    return cache


def _assert_offline_message(msg: str, name: str) -> None:
    assert f"'{name}'" in msg and "not reachable" in msg
    assert "embedded" in msg and "local weights file" in msg


@pytest.mark.parametrize(
    "endpoint",
    [
        "http://127.0.0.1:9",  # connection refused
        "https://10.255.255.1",  # black-holed (times out), or a proxy with the wrong certificate
        "http://10.255.255.1",  # black-holed, or a proxy / captive portal that answers but is no hub
    ],
)
def test_hub_unreachable_fails_fast(
    endpoint: str, empty_hub_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The real probe (no network needed): anything but an answer from the hub API fails in seconds."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", endpoint)
    start = time.monotonic()
    with pytest.raises(BackboneError) as err:
        load_backbone(ARCH, model_kwargs=TINY)
    assert time.monotonic() - start < 10
    _assert_offline_message(str(err.value), ARCH)


def test_hub_offline_flag_fails_fast(empty_hub_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    start = time.monotonic()
    with pytest.raises(BackboneError) as err:
        load_backbone("deit_tiny_patch16_224")
    assert time.monotonic() - start < 10
    _assert_offline_message(str(err.value), "deit_tiny_patch16_224")


def test_hub_loads_from_cache_offline(
    tmp_path: Path, empty_hub_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Weights already in the Hugging Face cache load with the hub unreachable."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
    hub_id = timm.models.get_pretrained_cfg(ARCH).hf_hub_id
    repo_dir = empty_hub_cache / ("models--" + hub_id.replace("/", "--"))
    commit = "0" * 40
    (repo_dir / "refs").mkdir(parents=True)
    (repo_dir / "refs" / "main").write_text(commit)
    snapshot = repo_dir / "snapshots" / commit
    snapshot.mkdir(parents=True)
    torch.manual_seed(5)
    source = timm.create_model(ARCH, pretrained=False, **TINY)  # with its 1000-class head, as on the hub
    save_file(_tensors(source), str(snapshot / "model.safetensors"))

    bk = load_backbone(ARCH, model_kwargs=TINY, device="cpu")
    assert bk.source == "hub" and bk.name == ARCH
    assert not any(p.requires_grad for p in bk.model.parameters())
    for k, v in source.state_dict().items():
        assert torch.equal(bk.model.state_dict()[k], v), k


def test_hub_non_vit_refused_before_network(empty_hub_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(BackboneError, match="'resnet18' is a ResNet, not a ViT/DeiT VisionTransformer"):
        load_backbone("resnet18")


def test_hub_unknown_name_refused() -> None:
    with pytest.raises(BackboneError, match="'vit_banana_patch3' is not a timm model name.*embedded"):
        load_backbone("vit_banana_patch3")


# --- embedded ----------------------------------------------------------------------------------------


def _write_embedded(directory: Path, config: dict, state: dict[str, torch.Tensor]) -> tuple[Path, Path]:
    weights = directory / "embedded_vit.safetensors"
    card = directory / "embedded_vit.json"
    save_file(state, str(weights))
    card.write_text(json.dumps({"name": "tiny-embedded", "config": config, "class_names": ["a", "b"]}))
    return weights, card


def test_load_embedded_from_card(tmp_path: Path) -> None:
    """The embedded loader builds the model from the card's config and keeps the card's normalisation."""
    config = {
        "img_size": 32,
        "patch_size": 8,
        "embed_dim": 32,
        "depth": 2,
        "num_heads": 2,
        "num_classes": 0,
        "pretrained_cfg": {"mean": [0.1, 0.2, 0.3], "std": [0.4, 0.5, 0.6]},
    }
    torch.manual_seed(7)
    source = bb.build_vit(config)
    weights, card = _write_embedded(tmp_path, config, _tensors(source))
    bk = load_embedded(weights, card, device="cpu")
    assert bk.source == "embedded" and bk.name == "tiny-embedded" and bk.class_names == ("a", "b")
    assert bk.layout.mean == pytest.approx((0.1, 0.2, 0.3)) and bk.layout.std == pytest.approx(
        (0.4, 0.5, 0.6)
    )
    assert bk.weights_hash == weights_hash(source)
    assert bk.card["config"]["depth"] == 2


def test_load_embedded_card_does_not_fit_weights(tmp_path: Path) -> None:
    config = {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2, "num_classes": 0}
    deeper = bb.build_vit({**config, "depth": 3})
    weights, card = _write_embedded(tmp_path, config, _tensors(deeper))
    with pytest.raises(BackboneError, match="do not match the embedded backbone.*Unexpected keys"):
        load_embedded(weights, card)


def test_load_embedded_missing_file(tmp_path: Path) -> None:
    with pytest.raises(BackboneError) as err:
        load_embedded(tmp_path / "embedded_vit.safetensors", tmp_path / "embedded_vit.json")
    msg = str(err.value)
    assert "embedded backbone is missing" in msg and "embedded_vit.safetensors" in msg
    assert str(tmp_path) in msg


@pytest.mark.slow
def test_embedded_backbone_loads(fixture_backbone: Backbone) -> None:
    """The shipped checkpoint: 96 px, patch 8, a 12x12 grid, frozen, and not the random fixture."""
    bk = load_backbone(device="cpu")
    lay = bk.layout
    assert bk.source == "embedded"
    assert lay.img_size == (96, 96) and lay.patch_size == (8, 8) and lay.grid == (12, 12)
    assert lay.has_cls and lay.num_prefix_tokens >= 1
    assert not bk.model.training and not any(p.requires_grad for p in bk.model.parameters())
    assert bk.weights_hash != fixture_backbone.weights_hash and bk.name != fixture_backbone.name
    assert bk.weights_hash == load_backbone(device="cpu").weights_hash


@pytest.fixture
def local_hub(monkeypatch: pytest.MonkeyPatch):
    """A local HTTP server standing in for the hub API: 200 for one known repo, 404 otherwise."""
    import http.server
    import threading

    from huggingface_hub import constants

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
            ok = self.path == "/api/models/timm/known"
            self.send_response(200 if ok else 404)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(b"{}")

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{server.server_address[1]}")
    yield
    server.shutdown()
    server.server_close()


def test_hub_probe_needs_a_real_answer(local_hub: None) -> None:
    assert bb._hub_reachable(repo_id="timm/known")
    assert not bb._hub_reachable(repo_id="timm/unknown")


def test_hub_repo_id_for_timm_names() -> None:
    assert bb._hub_repo_id(ARCH) == "timm/vit_tiny_patch16_224.augreg_in21k_ft_in1k"
