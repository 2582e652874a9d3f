"""Image encoder registry: spec grammar and errors, pixels, a tiny open_clip model, checkpoints."""

from __future__ import annotations

import json
import pickle
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cdir.core.errors import CdirError, ModelUnavailable
from tests.helpers.tiny_models import TINY_CLIP, write_tiny_clip_config

torch.set_num_threads(1)

def picture(seed: int, size: tuple[int, int] = (80, 64)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def tiny_clip_json(tmp_path_factory) -> Path:
    return write_tiny_clip_config(tmp_path_factory.mktemp("clipcfg"))


# -- registry and spec grammar ---------------------------------------------------------------------

def test_unknown_scheme_lists_known_schemes():
    from encoders.image import load_image_encoder

    with pytest.raises(CdirError) as e:
        load_image_encoder("vgg:16")
    msg = str(e.value)
    assert "vgg:16" in msg and "clip:" in msg and "ckpt:" in msg and "pixels" in msg
    with pytest.raises(CdirError, match="text encoder"):
        load_image_encoder("st:all-MiniLM-L6-v2")


def test_clip_spec_grammar(tmp_path, tiny_clip_json):
    from encoders.clip import parse_clip_spec

    cs = parse_clip_spec("clip:ViT-B-32/openai")
    assert (cs.kind, cs.arch, cs.pretrained) == ("name", "ViT-B-32", "openai")
    cs = parse_clip_spec("clip:ViT-B-32/ckpts/run 1/epoch.pt")  # a relative path keeps its slashes
    assert (cs.arch, cs.pretrained) == ("ViT-B-32", "ckpts/run 1/epoch.pt")
    cs = parse_clip_spec(f"clip:{tiny_clip_json}//abs/weights.pt")
    assert (cs.kind, cs.arch, cs.pretrained) == ("json", str(tiny_clip_json), "/abs/weights.pt")
    cs = parse_clip_spec(f"clip:{tiny_clip_json}/random")
    assert cs.pretrained == "random"
    cs = parse_clip_spec("clip:hf-hub:laion/CLIP-ViT-B-32-laion2B-s34B-b79K")
    assert (cs.kind, cs.arch) == ("hf-hub", "laion/CLIP-ViT-B-32-laion2B-s34B-b79K")
    assert parse_clip_spec(f"clip:{tmp_path}").kind == "folder"
    with pytest.raises(CdirError, match="nothing follows"):
        parse_clip_spec("clip:hf-hub:laion/x/openai")
    with pytest.raises(CdirError, match="unknown open_clip architecture 'NoSuchNet'"):
        parse_clip_spec("clip:NoSuchNet/openai")


def test_clip_spec_errors_name_the_fix():
    from encoders.image import load_image_encoder

    with pytest.raises(CdirError, match=r"no weights given.*openai"):
        load_image_encoder("clip:ViT-B-32")
    with pytest.raises(CdirError, match="neither an open_clip tag of ViT-B-32 nor"):
        load_image_encoder("clip:ViT-B-32/not-a-tag")


# -- pixels ----------------------------------------------------------------------------------------

def test_pixels_encoder():
    from encoders.image import load_image_encoder

    enc = load_image_encoder("pixels")
    assert enc.dim == 1024 and enc.device.type == "cpu"
    transform = pickle.loads(pickle.dumps(enc.transform))  # runs in DataLoader workers
    x = transform(picture(0))
    assert x.shape == (1024,) and abs(float(x.mean())) < 1e-5
    grad = np.tile(np.linspace(0, 150, 64, dtype=np.uint8), (64, 1))
    dark = Image.fromarray(np.stack([grad] * 3, -1))
    light = Image.fromarray(np.stack([grad + 60] * 3, -1))
    v = enc.encode_images([dark, light, picture(1)])
    assert v.shape == (3, 1024)
    np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1, atol=1e-5)
    assert float(v[0] @ v[1]) > 0.999  # a brightness shift cancels with the mean
    assert float(v[0] @ v[2]) < 0.5


# -- clip ------------------------------------------------------------------------------------------

def test_tiny_clip_random_weights(tiny_clip_json, capfd):
    from encoders.clip import clear_cache, load_open_clip
    from encoders.image import load_image_encoder

    spec = f"clip:{tiny_clip_json}/random"
    clear_cache()
    enc = load_image_encoder(spec, device="cpu")
    assert "random weights" in capfd.readouterr().err
    # the identity names the random seed and the config's content (tests/e2e/test_content_keys.py)
    assert enc.dim == 32 and enc.params["weights"].startswith("random-seed0@cfg:sha256:")
    transform = pickle.loads(pickle.dumps(enc.transform))
    assert transform(picture(0)).shape == (3, 64, 64)
    images = [picture(0), picture(1, (40, 90))]
    v = enc.encode_images(images)
    assert v.shape == (2, 32) and v.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1, atol=1e-5)
    assert not np.allclose(v[0], v[1])

    model, preprocess, tokenizer = load_open_clip(spec)
    assert load_open_clip(spec)[0] is model  # cached: image and text towers share one model
    tokens = tokenizer(["a photo of a cat", "a sketch of a dog"])
    assert tokens.shape == (2, 77) and int(tokens[0, 0]) == 49406  # real BPE: <start_of_text>
    assert int((tokens[0] != 0).sum()) == 7  # sot + 5 words + eot
    with torch.inference_mode():
        assert model.encode_text(tokens).shape == (2, 32)

    clear_cache()  # seeded: a fresh load (or another process) gets the same random weights
    np.testing.assert_allclose(load_image_encoder(spec).encode_images(images), v, atol=1e-6)


def test_split_transform_gives_the_same_tensors(tiny_clip_json):
    """The embed stage's split (uint8 per image, float and normalised per batch) gives the very
    tensors of the whole transform: open_clip's preprocess (RGB conversion, timm-style
    MaybeToTensor) and the ckpt evaluation transform, on square and cropped images; what it
    cannot split runs whole."""
    from torchvision import transforms as T

    from encoders.image import PixelsTransform, eval_transform, load_image_encoder, split_transform

    # cropped after the resize, or already the crop size (the crop passes it through)
    images = [picture(0), picture(1, (40, 90)), picture(2, (300, 128)), picture(3, (96, 96))]
    clip_preprocess = load_image_encoder(f"clip:{tiny_clip_json}/random").transform
    for whole in (clip_preprocess, eval_transform(),
                  eval_transform(37, 1.3, (.1, .2, .3), (.5, .6, .7)),
                  T.Compose([T.Resize(20), T.CenterCrop(16), T.ToTensor()])):
        per_image, finish = pickle.loads(pickle.dumps(split_transform(whole)))
        assert finish is not None and per_image(images[0]).dtype == torch.uint8
        want = torch.stack([whole(im) for im in images])
        got = finish(torch.stack([per_image(im) for im in images]))
        assert got.dtype == want.dtype and torch.equal(got, want)
    for whole in (PixelsTransform(), T.Compose([T.ToTensor(), T.Normalize([.5], [.5], True)])):
        assert split_transform(whole) == (whole, None)


def test_clip_local_checkpoint_path_with_slashes(tiny_clip_json, tmp_path):
    import open_clip

    from encoders.clip import clear_cache
    from encoders.image import load_image_encoder

    clear_cache()
    base = load_image_encoder(f"clip:{tiny_clip_json}/random")
    model = open_clip.create_model(tiny_clip_json.stem)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.05)
    ckpt = tmp_path / "sub dir" / "tiny.pt"
    ckpt.parent.mkdir()
    torch.save({"epoch": 3, "state_dict": model.state_dict()}, ckpt)
    enc = load_image_encoder(f"clip:{tiny_clip_json}/{ckpt}")  # absolute path → ".json//..."
    assert enc.params["weights"].startswith("sha256:")  # the checkpoint's content hash
    img = picture(5)
    model.eval()
    with torch.inference_mode():
        ref = torch.nn.functional.normalize(model.encode_image(enc.transform(img)[None]), dim=1)
    got = enc.encode_images([img])
    np.testing.assert_allclose(got, ref.numpy(), atol=1e-5)
    assert not np.allclose(got, base.encode_images([img]), atol=1e-3)

    model.visual.proj = None  # a checkpoint of another shape: one clear line, no traceback
    torch.save(model.state_dict(), tmp_path / "wrong.pt")
    with pytest.raises(CdirError, match="cannot load"):
        load_image_encoder(f"clip:{tiny_clip_json}/{tmp_path / 'wrong.pt'}")


@pytest.fixture
def empty_hub_cache(tmp_path, monkeypatch):
    """An empty Hugging Face cache, so the test means the same on a machine that has models."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    return tmp_path / "hub"


@pytest.mark.parametrize("spec,repo", [
    ("clip:ViT-B-32/openai", "timm/vit_base_patch32_clip_224.openai"),
    ("clip:ViT-B-32/laion2b_s34b_b79k", "laion/CLIP-ViT-B-32-laion2B-s34B-b79K"),
    ("clip:hf-hub:laion/CLIP-ViT-B-32-laion2B-s34B-b79K", "laion/CLIP-ViT-B-32-laion2B-s34B-b79K"),
])
def test_uncached_clip_offline_is_one_quick_error(spec, repo, empty_hub_cache, monkeypatch):
    from encoders.image import load_image_encoder

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t0 = time.perf_counter()
    with pytest.raises(ModelUnavailable) as e:
        load_image_encoder(spec)
    assert time.perf_counter() - t0 < 5  # no network retries
    msg = str(e.value)
    assert "\n" not in msg and spec in msg and repo in msg
    assert "not in the local Hugging Face cache" in msg and "HF_HUB_OFFLINE" in msg
    assert "on a machine with internet" in msg and "clip:" in msg.split("or pass", 1)[1]


def test_open_clip_hub_weight_names_and_download_blocked(monkeypatch):
    from encoders.clip import WEIGHT_FILES, hub_weights
    from encoders.hub import download_blocked

    assert hub_weights("timm/vit_base_patch32_clip_224.openai/") == (
        "timm/vit_base_patch32_clip_224.openai", "", list(WEIGHT_FILES))
    assert hub_weights("org/repo/weights.bin") == (
        "org/repo", "weights.bin", ["weights.safetensors", "weights.bin"])
    assert hub_weights("org/repo/w.safetensors") == ("org/repo", "w.safetensors",
                                                     ["w.safetensors"])
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert download_blocked() == "HF_HUB_OFFLINE is set"


def test_uncached_clip_unreachable_hub_fails_fast(empty_hub_cache, monkeypatch):
    from encoders.image import load_image_encoder

    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HTTPS_PROXY", "https_proxy",
                "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens: refused at once
    t0 = time.perf_counter()
    with pytest.raises(ModelUnavailable, match="unreachable"):
        load_image_encoder("clip:ViT-B-32/openai")
    assert time.perf_counter() - t0 < 5


def _fake_hub_repo(cache: Path, repo: str, files: dict[str, bytes]) -> None:
    """A repository in the Hugging Face cache layout, as a download would leave it."""
    base = cache / f"models--{repo.replace('/', '--')}"
    (base / "refs").mkdir(parents=True)
    (base / "refs" / "main").write_text("0" * 40)
    snap = base / "snapshots" / ("0" * 40)
    snap.mkdir(parents=True)
    for name, data in files.items():
        (snap / name).write_bytes(data)


def test_clip_tag_and_hf_hub_load_from_the_local_cache(tiny_clip_json, empty_hub_cache,
                                                       monkeypatch):
    """Cached weights load offline: a tag (with its QuickGELU flag) and an hf-hub: repository."""
    import open_clip
    from open_clip import pretrained as oc_pretrained
    from safetensors.torch import save

    from encoders.clip import clear_cache, load_open_clip
    from encoders.image import load_image_encoder

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    clear_cache()
    name = tiny_clip_json.stem
    load_open_clip(f"clip:{tiny_clip_json}/random")  # registers the config under its stem
    torch.manual_seed(9)
    ref = open_clip.create_model(name, force_quick_gelu=True)
    with torch.no_grad():
        for p in ref.parameters():
            p.normal_(0, 0.05)
    weights = save({k: v.contiguous() for k, v in ref.state_dict().items()})
    config = {"model_cfg": TINY_CLIP, "preprocess_cfg": {"mean": [0.5] * 3, "std": [0.5] * 3}}
    _fake_hub_repo(empty_hub_cache, "cdir-test/tiny-clip-tag",
                   {"open_clip_model.safetensors": weights})
    _fake_hub_repo(empty_hub_cache, "cdir-test/tiny-clip-hub",
                   {"open_clip_model.safetensors": weights,
                    "open_clip_config.json": json.dumps(config).encode()})
    monkeypatch.setitem(oc_pretrained._PRETRAINED, name, {
        "cached": {"hf_hub": "cdir-test/tiny-clip-tag/", "quick_gelu": True,
                   "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)}})

    img = picture(8)
    tagged = load_image_encoder(f"clip:{name}/cached")
    assert tagged.params["weights"].startswith("tag:cached@")  # and the cached file's identity
    assert tagged.transform.transforms[-1].mean == (0.5, 0.5, 0.5)  # the tag's preprocessing
    np.testing.assert_allclose(tagged.encode_images([img]),
                               _reference(ref.encode_image, tagged.transform, img), atol=1e-5)

    hub = load_image_encoder("clip:hf-hub:cdir-test/tiny-clip-hub")
    plain = open_clip.create_model(name)  # the repo's config has no QuickGELU
    plain.load_state_dict(ref.state_dict())
    np.testing.assert_allclose(hub.encode_images([img]),
                               _reference(plain.encode_image, hub.transform, img), atol=1e-5)
    assert not np.allclose(hub.encode_images([img]), tagged.encode_images([img]), atol=1e-4)
    tokens = load_open_clip("clip:hf-hub:cdir-test/tiny-clip-hub")[2](["a cat"])
    assert tokens.shape == (1, 77)


# -- ckpt ------------------------------------------------------------------------------------------

def _reference(model, transform, img: Image.Image) -> np.ndarray:
    """What the encoder must output: the bare model on the same input, L2-normalised."""
    if isinstance(model, torch.nn.Module):
        model.eval()
    else:
        model.__self__.eval()
    with torch.inference_mode():
        return torch.nn.functional.normalize(model(transform(img)[None]).flatten(1), dim=1).numpy()


def test_ckpt_reference_moco_resnet50(tmp_path):
    import torchvision
    from torch import nn

    from encoders.image import load_image_encoder

    torch.manual_seed(0)
    net = torchvision.models.resnet50()
    net.fc = nn.Sequential(nn.Linear(2048, 2048), nn.ReLU(), nn.Linear(2048, 128))  # MoCo v2 MLP
    sd = {f"module.encoder_q.{k}": v for k, v in net.state_dict().items()}
    sd.update({f"module.encoder_k.{k}": v.clone() for k, v in net.state_dict().items()})
    sd["module.queue"] = torch.randn(128, 64)
    sd["module.queue_ptr"] = torch.zeros(1, dtype=torch.long)
    path = tmp_path / "checkpoint_0199.pth.tar"
    torch.save({"epoch": 200, "arch": "resnet50", "state_dict": sd, "optimizer": {}}, path)

    enc = load_image_encoder(f"ckpt:{path}", device="cpu")
    assert enc.dim == 2048
    names = [type(t).__name__ for t in enc.transform.transforms]
    assert names == ["Resize", "CenterCrop", "ToTensor", "Normalize"]
    assert enc.transform.transforms[0].size == 256 and enc.transform.transforms[1].size == (224,
                                                                                            224)
    img = picture(3, (300, 200))
    net.fc = nn.Identity()  # the encoder is the trunk: global-pooled 2048-d, head dropped
    np.testing.assert_allclose(enc.encode_images([img]), _reference(net, enc.transform, img),
                               atol=1e-5)


def test_ckpt_plain_torchvision_resnet18(tmp_path):
    import torchvision
    from torch import nn

    from encoders.image import load_image_encoder

    torch.manual_seed(1)
    net = torchvision.models.resnet18()
    torch.save(net.state_dict(), tmp_path / "r18.pth")
    img = picture(4)
    inferred = load_image_encoder(f"ckpt:{tmp_path / 'r18.pth'}?size=64")
    given = load_image_encoder(f"ckpt:{tmp_path / 'r18.pth'}?arch=resnet18&size=64")
    assert inferred.dim == given.dim == 512
    assert inferred.transform(img).shape == (3, 64, 64)
    net.fc = nn.Identity()
    ref = _reference(net, inferred.transform, img)
    np.testing.assert_allclose(inferred.encode_images([img]), ref, atol=1e-5)
    np.testing.assert_allclose(given.encode_images([img]), ref, atol=1e-5)


def test_ckpt_other_torchvision_arch_and_timm(tmp_path):
    import timm
    import torchvision

    from encoders.image import load_image_encoder

    torch.manual_seed(2)
    net = torchvision.models.mobilenet_v3_small()
    torch.save({"model": net.state_dict(), "epoch": 1}, tmp_path / "mnv3.pth")
    enc = load_image_encoder(f"ckpt:{tmp_path / 'mnv3.pth'}?arch=mobilenet_v3_small&size=64")
    assert enc.dim == 1024  # classifier Linear(576, 1024) ... Linear(1024, 1000): last one goes
    assert enc.encode_images([picture(0)]).shape == (1, 1024)

    tnet = timm.create_model("resnet18", pretrained=False)
    torch.save(tnet.state_dict(), tmp_path / "timm_r18.pth")
    tenc = load_image_encoder(f"ckpt:timm:resnet18?file={tmp_path / 'timm_r18.pth'}")
    assert tenc.dim == 512
    tnet.reset_classifier(0)
    img = picture(6)
    np.testing.assert_allclose(tenc.encode_images([img]), _reference(tnet, tenc.transform, img),
                               atol=1e-5)


def test_ckpt_project_export_uses_recorded_size(tmp_path):
    from encoders.image import load_image_encoder
    from encoders.zoo.backbones import build_backbone

    torch.manual_seed(3)
    net, dim = build_backbone("resnet18", width=0.5, small_stem=True)
    path = tmp_path / "encoder.pt"
    torch.save({"version": 1, "method": "synco", "config": {"aug": {"size": 64}},
                "encoder_arch": {"name": "resnet18", "kwargs": {"width": 0.5, "small_stem": True}},
                "encoder": net.state_dict()}, path)
    enc = load_image_encoder(f"ckpt:{path}")
    assert enc.dim == dim == 256 and enc.params["size"] == 64
    img = picture(7, (120, 90))
    assert enc.transform(img).shape == (3, 64, 64)
    np.testing.assert_allclose(enc.encode_images([img]), _reference(net, enc.transform, img),
                               atol=1e-5)


def test_ckpt_errors_are_one_clear_line(tmp_path):
    import torchvision

    from encoders.image import load_image_encoder

    with pytest.raises(CdirError, match="no such checkpoint file"):
        load_image_encoder(f"ckpt:{tmp_path / 'missing.pt'}")
    torch.save({"weights": {"alpha.weight": torch.zeros(2), "beta.bias": torch.zeros(2)}},
               tmp_path / "odd.pt")
    with pytest.raises(CdirError) as e:
        load_image_encoder(f"ckpt:{tmp_path / 'odd.pt'}")
    assert "top-level keys: weights" in str(e.value) and "?arch=" in str(e.value)
    torch.save({"alpha.weight": torch.zeros(2)}, tmp_path / "flat.pt")
    with pytest.raises(CdirError, match="alpha.weight"):
        load_image_encoder(f"ckpt:{tmp_path / 'flat.pt'}")
    torch.save(torchvision.models.resnet18().state_dict(), tmp_path / "r18.pth")
    with pytest.raises(CdirError, match="do not fit resnet50"):
        load_image_encoder(f"ckpt:{tmp_path / 'r18.pth'}?arch=resnet50")
    with pytest.raises(CdirError, match="unknown option"):
        load_image_encoder(f"ckpt:{tmp_path / 'r18.pth'}?depth=18")
    with pytest.raises(CdirError, match="unknown timm model"):
        load_image_encoder("ckpt:timm:no_such_net")
