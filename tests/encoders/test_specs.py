"""The model-spec grammar (`encoders.specs`): parsing, validation, round trips, dispatch, and the
identity (cache key) of every spec, which must never change under existing workspaces."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cdir.core.workspace import spec_key

# -- identity: the cache key of existing workspaces ------------------------------------------------

# Fixed bytes stand in for the weights files: `model_identity` hashes a ckpt file without loading
# it, so the identities below are stable across torch versions.
FILES = {
    "enc.pt": b"a tiny encoder checkpoint",
    "timm.bin": b"timm weights",
    "clip.pt": b"clip weights",
    "st/model.safetensors": b"sentence-transformers weights",
}
CLIP_CFG = {"embed_dim": 32,
            "vision_cfg": {"image_size": 64, "layers": 2, "width": 64, "patch_size": 16,
                           "head_width": 32},
            "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2,
                         "layers": 2}}

# spec -> (model_identity(spec).id, spec_key(spec)), measured on the code before the grammar moved
# into encoders.specs (hand-parsed if-chains in encoders/hub.py and encoders/image.py) and frozen
# here: a change of either value orphans the embeddings of existing workspaces.
GOLDEN: dict[str, tuple[str | None, str]] = {
    "pixels": (None, "pixels-09bc7b2d"),
    "ckpt:enc.pt": ("sha256:335bfcfb5cbca833", "ckpt-enc.pt-5feb7448"),
    "ckpt:enc.pt?grid=4": ("sha256:335bfcfb5cbca833", "ckpt-enc.pt-grid-4-c1b77362"),
    "ckpt:enc.pt?grid=4&layers=3,4":
        ("sha256:335bfcfb5cbca833", "ckpt-enc.pt-grid-4-layers-3-4-4aba6ed8"),
    "ckpt:enc.pt?grid=2&layers=4&bn=domain":
        ("sha256:335bfcfb5cbca833", "ckpt-enc.pt-grid-2-layers-4-bn-domain-d26a7872"),
    "ckpt:enc.pt?bn=domain": ("sha256:335bfcfb5cbca833", "ckpt-enc.pt-bn-domain-772d0dbc"),
    "ckpt:enc.pt?features=head": ("sha256:335bfcfb5cbca833", "ckpt-enc.pt-features-head-7f339c31"),
    "ckpt:enc.pt?features=backbone&size=64":
        ("sha256:335bfcfb5cbca833", "ckpt-enc.pt-features-backbone-size-64-b88a86f7"),
    "ckpt:enc.pt?arch=resnet18": ("sha256:335bfcfb5cbca833", "ckpt-enc.pt-arch-resnet18-2dc2335b"),
    "ckpt:enc.pt?arch=convnext_tiny&size=96":
        ("sha256:335bfcfb5cbca833", "ckpt-enc.pt-arch-convnext_tiny-size-96-c38ede77"),
    "ckpt:enc.pt?size=64&grid=1&layers=1,2,3,4":
        ("sha256:335bfcfb5cbca833", "ckpt-enc.pt-size-64-grid-1-layers-1-2-3-4-6a8ddccc"),
    "ckpt:missing.pt": (None, "ckpt-missing.pt-f059da5a"),
    "ckpt:timm:resnet18?file=timm.bin":
        ("sha256:e77fdd7e663d5487", "ckpt-timm-resnet18-file-timm.bin-ecb5f362"),
    "ckpt:timm:resnet18": (None, "ckpt-timm-resnet18-79cbc0d8"),
    "clip:cfg.json/random":
        ("random-seed0@cfg:sha256:8fd351fd69ad8fb8", "clip-cfg.json-random-316213fe"),
    "clip:cfg.json/clip.pt":
        ("sha256:636cba6b3de795dd@cfg:sha256:8fd351fd69ad8fb8", "clip-cfg.json-clip.pt-69cff17b"),
    "clip:cfg.json": (None, "clip-cfg.json-5924cba4"),
    "clip:ViT-B-32/openai": (None, "clip-ViT-B-32-openai-bb12bba8"),
    "clip:ViT-B-32/clip.pt": ("sha256:636cba6b3de795dd", "clip-ViT-B-32-clip.pt-02a6ad2d"),
    "clip:hf-hub:laion/CLIP-ViT-B-32-laion2B-s34B-b79K":
        (None, "clip-hf-hub-laion-CLIP-ViT-B-32-laion2B-s34B-b79K-8296a959"),
    "st:all-MiniLM-L6-v2": ("sha256:53aa51172d142c89", "st-all-MiniLM-L6-v2-c66e323e"),
    "st:sentence-transformers/all-MiniLM-L6-v2":
        ("sha256:53aa51172d142c89", "st-sentence-transformers-all-MiniLM-L6-v2-4271357a"),
    "st:st": ("sha256:191066e5439efbfc", "st-st-aabae38b"),
    "hf:Salesforce/blip-image-captioning-base":
        (None, "hf-Salesforce-blip-image-captioning-base-f517724c"),
    "st:all-MiniLM-L6-v2@captions:hf-blip-abc":
        (None, "st-all-MiniLM-L6-v2-captions-hf-blip-abc-c36ef409"),
    "clip:cfg.json/random@captions:mine": (None, "clip-cfg.json-random-captions-mine-b7af120f"),
}


@pytest.fixture
def spec_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The files of GOLDEN's specs, under their relative names in the working directory, and an
    empty Hugging Face cache (so a hub model is "not here" on every machine)."""
    from huggingface_hub import constants

    for name, data in FILES.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(data)
    (tmp_path / "cfg.json").write_text(json.dumps(CLIP_CFG))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return tmp_path


@pytest.mark.parametrize("spec", list(GOLDEN))
def test_identity_and_key_unchanged(spec_files: Path, spec: str) -> None:
    from encoders.hub import model_identity

    assert (model_identity(spec).id, spec_key(spec)) == GOLDEN[spec]


def test_identity_takes_the_recorded_hashes(spec_files: Path) -> None:
    """A hash recorded with the embeddings (same size and mtime) is taken, not recomputed."""
    from encoders.hub import model_identity

    real = str((spec_files / "enc.pt").resolve())
    st = (spec_files / "enc.pt").stat()
    hints = {real: {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": "sha256:recorded"}}
    got = model_identity("ckpt:enc.pt?grid=2", hints)
    assert (got.id, got.main, list(got.files)) == ("sha256:recorded", "enc.pt", [real])
    assert model_identity(" ckpt:timm:resnet18?file=enc.pt ", hints).id == "sha256:recorded"


def test_a_loaded_encoder_reports_its_identity(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """The identity the loader records with the vectors is the one a later check computes."""
    from encoders.hub import model_identity
    from encoders.image import load_image_encoder
    from tests.helpers.tiny_models import write_tiny_encoder

    write_tiny_encoder(tmp_path / "enc.pt")
    monkeypatch.chdir(tmp_path)
    for spec in ("ckpt:enc.pt", "ckpt:enc.pt?grid=2&layers=3,4", "ckpt:enc.pt?size=48"):
        enc = load_image_encoder(spec, "cpu")
        assert enc.spec == spec
        assert enc.params["weights"] == model_identity(spec).id
        assert enc.params["weights"].startswith("sha256:")
