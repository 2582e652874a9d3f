"""encoders.captioners: every family captions real images from a local folder under
HF_HUB_OFFLINE=1 (tiny random models built from configs), family detection, keys, prompt handling,
model-not-available errors, and the out-of-memory batch halving."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch

from cdir.core.device import resolve_dtype
from cdir.core.errors import CdirError, ModelUnavailable
from encoders.captioners import (
    DEFAULT_PROMPTS,
    BatchHalver,
    _clean,
    captioner_key,
    is_oom,
    load_captioner,
    resolve_captioner,
)
from tests.helpers.tiny_models import FAMILIES, tiny_model_path
from tests.helpers.trees import draw_shape

# tiny model name -> detected family, where they differ
FAMILY_OF = {"llava": "chat", "llava_next": "chat", "blip-2-t5": "blip-2"}


pytestmark = pytest.mark.usefixtures("hf_offline")


@pytest.fixture(scope="module")
def gallery() -> list:
    """Six images of different sizes, styles and aspect ratios."""
    shapes = [("Circle", "Art", 64), ("Square", "Clipart", 48), ("Triangle", "Product", 80),
              ("Cross", "Real World", 40), ("Star", "Art", 96), ("Ring", "Clipart", 33)]
    imgs = [draw_shape(c, d, 0, s) for c, d, s in shapes]
    imgs[2] = imgs[2].resize((120, 40))  # wide: LLaVA-NeXT tiles it differently (padding)
    return imgs


@pytest.mark.parametrize("name", FAMILIES)
def test_every_family_captions_every_image(name: str, gallery: list) -> None:
    folder = tiny_model_path(name)
    cap = load_captioner(f"hf:{folder}", device="cpu", max_new_tokens=6, min_new_tokens=2)
    assert cap.family == FAMILY_OF.get(name, name)
    assert cap.device.type == "cpu" and cap.dtype == torch.float32
    captions = cap.caption(gallery)
    assert len(captions) == len(gallery)
    for c in captions:
        assert isinstance(c, str) and c.strip(), captions
        assert "\n" not in c and c == " ".join(c.split())  # one clean line
        assert "<image>" not in c and "[CLS]" not in c and "</s>" not in c
    # batched generation gives the same captions as one image at a time (no mixing of rows)
    assert [cap.caption([img])[0] for img in gallery[:3]] == captions[:3]
    assert cap.key.startswith(f"hf:{Path(folder).resolve()}|")


def test_family_detection_and_default_prompts() -> None:
    for name in FAMILIES:
        cs = resolve_captioner(f"hf:{tiny_model_path(name)}")
        family = FAMILY_OF.get(name, name)
        assert cs.family == family
        assert cs.params["prompt"] == DEFAULT_PROMPTS[family]
    assert DEFAULT_PROMPTS["florence2"] == "<CAPTION>"
    assert "Describe" in DEFAULT_PROMPTS["chat"]


def test_key_is_stable_and_records_every_parameter() -> None:
    folder = tiny_model_path("blip")
    a = resolve_captioner(f"hf:{folder}", max_new_tokens=12, num_beams=3, prompt="a picture of")
    b = resolve_captioner(str(folder), max_new_tokens=12, num_beams=3, prompt="a picture of")
    assert a.key == b.key  # with or without "hf:", the same folder gives the same key
    assert a.params == {"prompt": "a picture of", "max_new_tokens": 12, "min_new_tokens": 0,
                        "num_beams": 3}
    others = [resolve_captioner(f"hf:{folder}", max_new_tokens=12, num_beams=3),
              resolve_captioner(f"hf:{folder}", max_new_tokens=13, num_beams=3,
                                prompt="a picture of"),
              resolve_captioner(f"hf:{folder}", max_new_tokens=12, num_beams=1,
                                prompt="a picture of")]
    assert len({a.key, *(o.key for o in others)}) == 4
    assert captioner_key("hf:x", {"b": 1, "a": "q"}) == 'hf:x|a="q",b=1'
    # the loaded captioner reports the key its spec announced, and beams work
    cap = a.load()
    assert cap.key == a.key and cap.params == a.params
    assert all(c.strip() for c in cap.caption([draw_shape("Circle", "Art", 0, 40)]))


def test_prompt_is_not_echoed_in_captions(gallery: list) -> None:
    prompt = "A picture of"  # BLIP's tokenizer lower-cases: the echo reads "a picture of"
    for name in ("blip", "git", "blip-2", "blip-2-t5", "florence2"):
        cap = load_captioner(f"hf:{tiny_model_path(name)}", prompt=prompt, max_new_tokens=5,
                             min_new_tokens=2)
        for c in cap.caption(gallery[:2]):
            assert c.strip() and not c.lower().startswith("a picture of"), (name, c)


def test_clean() -> None:
    assert _clean("  a picture of  a dog\non a\tcouch ", ["a picture of"]) == "a dog on a couch"
    assert _clean("A Picture Of a cat", ["a picture of"]) == "a cat"
    assert _clean("a cat", ["a picture of"]) == "a cat"
    assert _clean("", ["x"]) == ""


def test_chat_instruction_goes_through_the_chat_template() -> None:
    cap = load_captioner(f"hf:{tiny_model_path('llava')}", prompt="What is this?",
                         max_new_tokens=4, min_new_tokens=4)
    assert cap._text is not None and cap._text.startswith("USER:")
    assert "What is this?" in cap._text and cap._text.rstrip().endswith("ASSISTANT:")
    (c,) = cap.caption([draw_shape("Circle", "Art", 0, 40)])
    assert "What is this" not in c and "ASSISTANT" not in c.split()[0]


def test_florence2_rejects_non_caption_tasks() -> None:
    folder = tiny_model_path("florence2")
    with pytest.raises(CdirError, match="not a Florence-2 captioning task.*<CAPTION>"):
        resolve_captioner(f"hf:{folder}", prompt="<OD>")
    cs = resolve_captioner(f"hf:{folder}", prompt="<DETAILED_CAPTION>")
    assert cs.params["prompt"] == "<DETAILED_CAPTION>"


def test_unknown_family_lists_the_supported_ones(tmp_path: Path) -> None:
    from transformers import BertConfig

    BertConfig(hidden_size=8, num_hidden_layers=1, num_attention_heads=1,
               intermediate_size=8).save_pretrained(tmp_path / "bert")
    with pytest.raises(CdirError, match="'bert' is not a supported captioner family.*blip.*"
                                        "blip-2.*git.*florence2.*chat"):
        resolve_captioner(f"hf:{tmp_path / 'bert'}")


def test_missing_model_fails_fast_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                          ) -> None:
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # an empty cache
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    t = time.perf_counter()
    with pytest.raises(ModelUnavailable) as err:
        load_captioner("hf:nobody-here/no-such-captioner")
    assert time.perf_counter() - t < 5
    msg = str(err.value)
    assert "nobody-here/no-such-captioner" in msg and "HF_HUB_OFFLINE" in msg
    assert "hf:/path/to/folder" in msg and "hf download" in msg


def test_missing_model_fails_fast_when_hub_unreachable(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    # online: the module's hf_offline set HF_HUB_OFFLINE, undo it (and TRANSFORMERS_OFFLINE is
    # never inherited from the caller: see tests/conftest.py)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    for var in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens on the discard port
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_OFFLINE", False)
    t = time.perf_counter()
    with pytest.raises(ModelUnavailable, match="unreachable"):
        resolve_captioner("hf:nobody-here/no-such-captioner")
    assert time.perf_counter() - t < 10


def test_bad_specs_and_parameters(tmp_path: Path) -> None:
    with pytest.raises(CdirError, match="no model folder"):
        resolve_captioner(f"hf:{tmp_path / 'nope'}")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CdirError, match="no config.json"):
        resolve_captioner(f"hf:{tmp_path / 'empty'}")
    with pytest.raises(CdirError, match="not a captioner spec"):
        resolve_captioner("clip:ViT-B-32/openai")
    folder = tiny_model_path("blip")
    with pytest.raises(CdirError, match="invalid generation parameters"):
        resolve_captioner(f"hf:{folder}", max_new_tokens=0)
    with pytest.raises(CdirError, match="invalid generation parameters"):
        resolve_captioner(f"hf:{folder}", max_new_tokens=4, min_new_tokens=5)
    with pytest.raises(CdirError, match="takes no prompt"):
        resolve_captioner(f"hf:{tiny_model_path('vision-encoder-decoder')}", prompt="a photo")


def test_dtype_choice_and_half_precision_inputs() -> None:
    cpu = torch.device("cpu")
    assert resolve_dtype(cpu) == torch.float32
    assert resolve_dtype(cpu, "bf16") == torch.bfloat16
    assert resolve_dtype(cpu, "fp16") == torch.float16
    with pytest.raises(CdirError, match="unknown dtype"):
        resolve_dtype(cpu, "int8")
    # bf16 weights get bf16 pixels (the processor makes fp32): a mismatch would raise here
    cap = load_captioner(f"hf:{tiny_model_path('blip')}", dtype="bf16", max_new_tokens=3,
                         min_new_tokens=1)
    assert next(cap.model.parameters()).dtype == torch.bfloat16
    assert len(cap.caption([draw_shape("Circle", "Art", 0, 40)])) == 1


def test_blip2_processor_without_num_query_tokens(tmp_path: Path) -> None:
    """Processors saved before transformers 4.46 have no num_query_tokens: filled from config."""
    import shutil

    folder = tmp_path / "blip2-old"
    shutil.copytree(tiny_model_path("blip-2"), folder)
    cfg_path = folder / "processor_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.pop("num_query_tokens", None)
    cfg_path.write_text(json.dumps(cfg))
    cap = load_captioner(f"hf:{folder}", max_new_tokens=3, min_new_tokens=2)
    assert cap.processor.num_query_tokens == cap.model.config.num_query_tokens
    assert cap.caption([draw_shape("Circle", "Art", 0, 40)])[0].strip()


# -- out-of-memory halving (an injected failure: a real OOM cannot be produced here) ---------

def _oom_above(limit: int, calls: list[int], error: type[Exception] = torch.cuda.OutOfMemoryError,
               message: str = "CUDA out of memory. Tried to allocate 2.00 GiB"):
    def fn(items: list) -> list:
        calls.append(len(items))
        if len(items) > limit:
            raise error(message)
        return [f"c{x}" for x in items]
    return fn


def test_batch_halves_on_oom_and_keeps_order() -> None:
    calls: list[int] = []
    shrinks: list[int] = []
    h = BatchHalver(16, on_shrink=shrinks.append)
    out = h.run(_oom_above(3, calls), list(range(37)))
    assert out == [f"c{i}" for i in range(37)]
    assert shrinks == [8, 4, 2] and h.batch_size == 2
    assert calls[:4] == [16, 8, 4, 2] and set(calls[4:]) <= {2, 1}
    # the smaller size is kept for later calls
    calls.clear()
    assert h.run(_oom_above(3, calls), list(range(5))) == [f"c{i}" for i in range(5)]
    assert max(calls) == 2


def test_cpu_out_of_memory_is_recognised() -> None:
    calls: list[int] = []
    h = BatchHalver(4)
    fn = _oom_above(1, calls, RuntimeError,
                    "[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate "
                    "memory: you tried to allocate 123 bytes")
    assert h.run(fn, [1, 2, 3]) == ["c1", "c2", "c3"] and h.batch_size == 1
    assert is_oom(RuntimeError("CUDA error: out of memory"))
    assert not is_oom(RuntimeError("shape mismatch"))


def test_batch_of_one_that_still_fails_is_reported() -> None:
    h = BatchHalver(4, where=" on cuda:0")
    with pytest.raises(CdirError, match="out of memory with a batch of one image on cuda:0"):
        h.run(_oom_above(0, []), [1, 2])


def test_other_errors_are_not_swallowed() -> None:
    def boom(items: list) -> list:
        raise ValueError("a real bug")

    with pytest.raises(ValueError, match="a real bug"):
        BatchHalver(8).run(boom, [1, 2, 3])
