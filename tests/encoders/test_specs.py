"""The model-spec grammar (`encoders.specs`): parsing, validation, round trips, dispatch, and the
identity (cache key) of every spec, which must never change under existing workspaces."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cdir.core.errors import CdirError
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


# -- the grammar -----------------------------------------------------------------------------------

CANONICAL = [
    ("pixels", "pixels", "", ()),
    ("clip:ViT-B-32/openai", "clip", "ViT-B-32/openai", ()),
    ("clip:hf-hub:laion/CLIP-ViT-B-32-laion2B-s34B-b79K", "clip",
     "hf-hub:laion/CLIP-ViT-B-32-laion2B-s34B-b79K", ()),
    ("clip:cfg/tiny.json//data/tiny.pt", "clip", "cfg/tiny.json//data/tiny.pt", ()),
    ("ckpt:runs/a b/encoder.pt", "ckpt", "runs/a b/encoder.pt", ()),
    ("ckpt:enc.pt?arch=convnext_tiny&size=96", "ckpt", "enc.pt",
     (("arch", "convnext_tiny"), ("size", "96"))),
    ("ckpt:enc.pt?features=head&size=64", "ckpt", "enc.pt", (("features", "head"), ("size", "64"))),
    ("ckpt:enc.pt?grid=4&layers=3,4&bn=domain", "ckpt", "enc.pt",
     (("grid", "4"), ("layers", "3,4"), ("bn", "domain"))),
    ("ckpt:enc.pt?layers=1,2&grid=1&features=backbone", "ckpt", "enc.pt",
     (("layers", "1,2"), ("grid", "1"), ("features", "backbone"))),
    ("ckpt:timm:resnet18", "ckpt:timm", "resnet18", ()),
    ("ckpt:timm:convnext_tiny?file=/w/convnext.safetensors", "ckpt:timm", "convnext_tiny",
     (("file", "/w/convnext.safetensors"),)),
    ("st:all-MiniLM-L6-v2", "st", "all-MiniLM-L6-v2", ()),
    ("st:/models/minilm", "st", "/models/minilm", ()),
    ("hf:Salesforce/blip-image-captioning-base", "hf", "Salesforce/blip-image-captioning-base",
     ()),
]


@pytest.mark.parametrize("text, scheme, body, options", CANONICAL)
def test_every_scheme_and_option_parses_and_round_trips(text: str, scheme: str, body: str,
                                                        options: tuple) -> None:
    from encoders.specs import SCHEMES, Spec, parse_spec

    spec = parse_spec(f"  {text} ")
    assert (spec.scheme, spec.body, spec.options, spec.text) == (scheme, body, options, text)
    assert str(spec) == text and spec == parse_spec(str(spec))
    assert Spec(scheme, body, options) == spec and Spec(scheme, body, options).text == text
    assert spec.info is SCHEMES[scheme]
    for name, value in options:
        assert spec.has(name) and spec.option(name) == value
    assert not spec.has("nope") and spec.option("nope", "x") == "x"


def test_conveniences() -> None:
    from encoders.specs import parse_spec

    ckpt = parse_spec("ckpt:~/enc.pt?grid=2")
    assert ckpt.checkpoint == ckpt.file == Path("~/enc.pt").expanduser()
    timm = parse_spec("ckpt:timm:resnet18?file=~/w.bin")
    assert timm.checkpoint is None and timm.file == Path("~/w.bin").expanduser()
    assert parse_spec("ckpt:timm:resnet18").file is None
    assert [parse_spec(s).cross_modal for s in ("clip:ViT-B-32/openai", "ckpt:a.pt", "st:x",
                                                "pixels")] == [True, False, False, False]
    # the last of an option given twice wins, as a query string reads
    assert parse_spec("ckpt:a.pt?size=32&size=64").option("size") == "64"
    # a value that a query string would alter is quoted back
    odd = parse_spec("ckpt:timm:resnet18?file=a%26b+c.bin")
    assert odd.option("file") == "a&b c.bin" and parse_spec(str(odd)) == odd


def test_default_scheme_for_bare_names() -> None:
    from encoders.specs import parse_spec

    assert parse_spec("Salesforce/blip", role="captioner") == parse_spec("hf:Salesforce/blip")
    assert parse_spec("runs/t/best.pt", default="ckpt").checkpoint == Path("runs/t/best.pt")
    assert parse_spec("C:/runs/best.pt", default="ckpt").body == "C:/runs/best.pt"  # a drive
    with pytest.raises(CdirError, match="unknown model spec 'vgg:16'"):
        parse_spec("vgg:16", default="ckpt")
    with pytest.raises(CdirError, match="unknown model spec"):
        parse_spec("runs/t/best.pt")


@pytest.mark.parametrize("text, match, valid", [
    ("ckpt:a.pt?depth=18", "unknown option(s) depth", "arch, size, features, grid, layers, bn"),
    ("ckpt:a.pt?file=w.bin", "unknown option(s) file", "arch, size, features, grid, layers, bn"),
    ("ckpt:timm:resnet18?bn=domain", "bn=domain needs a ResNet checkpoint of this project or "
     "MoCo/SynCo, not a timm model", "file"),
    ("ckpt:timm:resnet18?grid=4", "grid=N needs a ResNet checkpoint", "file"),
    ("ckpt:timm:resnet18?arch=x", "unknown option(s) arch", "file"),
    ("clip:ViT-B-32/openai?grid=4", "unknown option(s) grid", "none (clip: takes no ?options)"),
    ("st:all-MiniLM-L6-v2?bn=domain", "unknown option(s) bn", "none (st: takes no ?options)"),
    ("pixels?size=64", "unknown option(s) size", "none (pixels: takes no ?options)"),
])
def test_unknown_or_misplaced_options_are_one_line_naming_the_valid_ones(
        text: str, match: str, valid: str) -> None:
    from encoders.specs import parse_spec

    with pytest.raises(CdirError) as e:
        parse_spec(text)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"{text}: ") and match in msg
    assert msg.endswith(f"; allowed: {valid}")


@pytest.mark.parametrize("query, match", [
    ("bn=batch", "bn takes only the value domain"),
    ("bn=", "bn takes only the value domain"),
    ("bn=domain&arch=resnet18", "bn=domain needs the backbone"),
    ("bn=domain&features=head", "bn=domain needs the backbone"),
    ("features=proj", "features must be backbone or head"),
    ("features=head&arch=resnet18", "features=head needs a checkpoint of `cdir train`"),
    ("grid=2&features=head", "grid=N needs the backbone"),
    ("grid=2&arch=resnet18", "grid=N needs the backbone"),
    ("grid=0", "grid must be a positive integer"),
    ("grid=two", "grid must be a positive integer"),
    ("grid=2&layers=5", "layers must list ResNet layers 1-4"),
    ("layers=3,4", "layers=3,4 goes with grid=N"),
    ("size=0", "size must be a positive integer"),
    ("size=big", "size must be a positive integer"),
])
def test_bad_ckpt_option_values_and_combinations(query: str, match: str) -> None:
    from encoders.specs import parse_spec

    with pytest.raises(CdirError, match=match) as e:
        parse_spec(f"ckpt:a.pt?{query}")
    assert "\n" not in str(e.value)


def test_roles() -> None:
    from encoders.specs import ROLES, SCHEMES, parse_spec, usage

    assert parse_spec("clip:ViT-B-32/openai", role="text").scheme == "clip"
    with pytest.raises(CdirError, match=r"'st:x' is not an image encoder spec \(st: names a "
                                        r"text encoder\); known: pixels"):
        parse_spec("st:x", role="image")
    with pytest.raises(CdirError, match="not a captioner spec"):
        parse_spec("clip:ViT-B-32/openai", role="captioner")
    with pytest.raises(CdirError, match="unknown text encoder 'vgg:16'; known: clip:"):
        parse_spec("vgg:16", role="text")
    for role in ROLES:
        helps = [s.help for s in SCHEMES.values() if getattr(s, role) is not None]
        assert usage(role) == "; ".join(helps)
    assert "ckpt:timm:NAME[?file=PATH]" in usage("image") and "st:" not in usage("image")


def test_plain_checkpoint() -> None:
    from encoders.specs import plain_checkpoint

    assert plain_checkpoint("ckpt:runs/a.pt", "no") == Path("runs/a.pt")
    assert plain_checkpoint("runs/a.pt", "no") == Path("runs/a.pt")
    for bad in ("ckpt:a.pt?grid=2", "ckpt:timm:resnet18", "clip:ViT-B-32/openai", "vgg:16",
                "ckpt:a.pt?nope=1"):
        with pytest.raises(CdirError, match="^refused$"):
            plain_checkpoint(bad, "refused")


# -- the table -------------------------------------------------------------------------------------

def test_schemes_dispatch_every_role(spec_files: Path) -> None:
    """Each scheme names its identity and preflight; the loaders of a scheme are the ones
    load_image_encoder / load_text_encoder reach."""
    from encoders.hub import ModelId, Ready
    from encoders.image import PixelsEncoder, load_image_encoder
    from encoders.specs import SCHEMES, parse_spec

    assert set(SCHEMES) == {"pixels", "clip", "ckpt", "ckpt:timm", "st", "hf"}
    for scheme in SCHEMES.values():
        assert scheme.help and callable(scheme.identity) and callable(scheme.preflight)
    assert isinstance(load_image_encoder("pixels"), PixelsEncoder)
    ready = {s: parse_spec(s).info.preflight(parse_spec(s)) for s in (
        "pixels", "ckpt:enc.pt?grid=2", "ckpt:missing.pt", "ckpt:timm:resnet18?file=timm.bin",
        "clip:cfg.json/random", "st:st", "hf:nowhere/model")}
    assert all(isinstance(r, Ready) for r in ready.values())
    assert {s: r.status for s, r in ready.items()} == {
        "pixels": "ok", "ckpt:enc.pt?grid=2": "ok", "ckpt:missing.pt": "missing",
        "ckpt:timm:resnet18?file=timm.bin": "ok", "clip:cfg.json/random": "ok",
        "st:st": "ok", "hf:nowhere/model": "missing"}
    assert "hf download nowhere/model" in ready["hf:nowhere/model"].message
    assert isinstance(SCHEMES["hf"].identity(parse_spec("hf:a/b")), ModelId)


def test_importing_the_grammar_imports_no_torch() -> None:
    """`cdir --help` stays fast: the table's loaders import their modules when called."""
    import subprocess
    import sys

    code = ("import sys, encoders.specs as s; s.parse_spec('ckpt:a.pt?grid=2&layers=3,4'); "
            "s.usage(); heavy = [m for m in ('torch', 'numpy', 'open_clip', 'timm', "
            "'transformers', 'encoders.image', 'encoders.hub') if m in sys.modules]; "
            "print(heavy); sys.exit(bool(heavy))")
    root = Path(__file__).resolve().parents[2]
    done = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True,
                          text=True, env={**__import__("os").environ, "PYTHONPATH": str(root)})
    assert done.returncode == 0, done.stdout + done.stderr


def test_a_relative_checkpoint_path_falls_back_to_the_project_root(tmp_path: Path,
                                                                   monkeypatch) -> None:
    from encoders.specs import PROJECT_ROOT, parse_spec

    shipped = "encoders/weights/emoji_adapted.pt"
    monkeypatch.chdir(tmp_path)
    assert parse_spec(f"ckpt:{shipped}?grid=4").checkpoint == PROJECT_ROOT / shipped
    assert parse_spec(f"ckpt:timm:resnet18?file={shipped}").file == PROJECT_ROOT / shipped
    assert parse_spec("ckpt:nowhere/enc.pt").checkpoint == Path("nowhere/enc.pt")  # as given
    local = tmp_path / shipped  # a file of that name here is the one meant
    local.parent.mkdir(parents=True)
    local.write_bytes(b"x")
    assert parse_spec(f"ckpt:{shipped}").checkpoint.resolve() == local


def test_the_shipped_encoder_spec_embeds_from_another_folder(tmp_path: Path) -> None:
    """`cdir embed --encoder ckpt:encoders/weights/...` (as the README writes it) run from a
    folder outside the repository."""
    import os
    import subprocess
    import sys

    from tests.helpers.cli import REPO, emoji_workspace

    ws = emoji_workspace(tmp_path, 2)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, "-m", "cdir", "embed", "-w", str(ws), "--encoder",
         "ckpt:encoders/weights/emoji_adapted.pt?grid=4&layers=3,4", "--workers", "0",
         "--no-progress"], cwd=elsewhere, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
