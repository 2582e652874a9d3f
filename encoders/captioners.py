"""Image captioners over Hugging Face transformers: one interface, images in, caption strings out.

    cap = load_captioner("hf:Salesforce/blip-image-captioning-base", max_new_tokens=30)
    cap.caption([pil_image, ...])  -> ["a dog on a couch", ...]
    cap.key                        -> stable string of model + prompt + generation parameters

The family is read from the model's config (`model_type`), so a hub id and a local folder behave the
same. transformers 5 removed the image-to-text pipeline, so each family is driven through its model
class and processor:

    blip        BlipForConditionalGeneration; optional text prefix ("a picture of")
    blip-2      Blip2ForConditionalGeneration (OPT or Flan-T5); optional prompt
    git         GitForCausalLM; optional text prefix
    florence2   Florence2ForConditionalGeneration; a task prompt, <CAPTION> by default
    chat        LLaVA / LLaVA-NeXT and other image-text-to-text chat models: an instruction through
                the processor's chat template; only the newly generated tokens are decoded
    vision-encoder-decoder  e.g. nlpconnect/vit-gpt2-image-captioning; no prompt

Captions are returned without the prompt, on one line, whitespace collapsed. Generation is greedy or
beam search (never sampled), so a key always means the same captions.
"""

from __future__ import annotations

import gc
import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from cdir.core.device import resolve_device, resolve_dtype
from cdir.core.errors import CdirError, ModelUnavailable, first_line
from encoders.hub import download_blocked
from encoders.specs import parse_spec

# family -> (what it covers, example checkpoints); shown when a family is not supported
FAMILIES: dict[str, str] = {
    "blip": "BLIP (Salesforce/blip-image-captioning-base, -large)",
    "blip-2": "BLIP-2 with OPT or Flan-T5 (Salesforce/blip2-opt-2.7b, Salesforce/blip2-flan-t5-xl)",
    "git": "GIT (microsoft/git-base-coco, microsoft/git-large-coco)",
    "florence2": "Florence-2 (florence-community/Florence-2-base, -large)",
    "chat": "LLaVA-style chat models (llava-hf/llava-1.5-7b-hf, llava-hf/llava-v1.6-mistral-7b-hf, "
            "other image-text-to-text models with a chat template)",
    "vision-encoder-decoder": "vision encoder-decoder captioners "
                              "(nlpconnect/vit-gpt2-image-captioning)",
}

DEFAULT_PROMPTS: dict[str, str | None] = {
    "blip": None,
    "blip-2": None,
    "git": None,
    "florence2": "<CAPTION>",
    "chat": "Describe the main object in this image in one short sentence.",
    "vision-encoder-decoder": None,
}

DEFAULT_MAX_NEW_TOKENS = 30

FLORENCE_CAPTION_TASKS = ("<CAPTION>", "<DETAILED_CAPTION>", "<MORE_DETAILED_CAPTION>")

# model_type values handled by a dedicated path; other image-text-to-text types count as "chat"
_DIRECT = {"blip": "blip", "blip-2": "blip-2", "git": "git", "florence2": "florence2",
           "vision-encoder-decoder": "vision-encoder-decoder"}


def detect_family(config: Any) -> str:
    """The captioner family of a transformers config, from its ``model_type``."""
    model_type = getattr(config, "model_type", None)
    if model_type in _DIRECT:
        return _DIRECT[model_type]
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

    if model_type in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES:
        return "chat"
    supported = "; ".join(f"{k}: {v}" for k, v in FAMILIES.items())
    raise CdirError(f"model type {model_type!r} is not a supported captioner family. "
                    f"Supported: {supported}")


# -- locating the model ------------------------------------------------------------------------

def _looks_like_path(target: str) -> bool:
    return target.startswith(("/", "./", "../", "~", ".\\")) or target in (".", "..") or \
        bool(re.match(r"^[A-Za-z]:[\\/]", target))


def _unavailable(model_id: str, reason: str) -> ModelUnavailable:
    return ModelUnavailable(
        f"captioning model {model_id!r} is not in the Hugging Face cache and cannot be downloaded "
        f"({reason}): download it once where there is internet (`hf download {model_id}`, which "
        "fills the cache that HF_HOME points to), or save it to a folder and pass "
        "hf:/path/to/folder")



@dataclass
class _Source:
    """Where a model comes from: a local folder or a hub id (tried from the cache first)."""

    target: str  # folder path or hub id
    local: bool
    trust_remote_code: bool = False
    cache_only: bool = True  # hub ids: flipped to False once the cache missed and the hub answers

    def load(self, loader: Callable[..., Any], what: str, **kwargs) -> Any:
        kwargs = {"trust_remote_code": self.trust_remote_code, **kwargs}
        if self.local:
            try:
                return loader(self.target, **kwargs)
            except OSError as e:
                raise CdirError(f"cannot load the {what} from {self.target}: {first_line(e)}") \
                    from None
        if self.cache_only:
            try:
                return loader(self.target, local_files_only=True, **kwargs)
            except OSError:
                blocked = download_blocked()
                if blocked:
                    raise _unavailable(self.target, blocked) from None
            self.cache_only = False  # not (fully) cached, but the hub answers: download
        try:
            return loader(self.target, **kwargs)
        except OSError as e:
            raise _unavailable(self.target, first_line(e)) from None


def _source(target: str, trust_remote_code: bool) -> _Source:
    path = Path(target).expanduser()
    if path.is_dir():
        if not (path / "config.json").exists():
            raise CdirError(f"{path} has no config.json: pass a folder saved with "
                            "`save_pretrained` (model and processor)")
        return _Source(str(path.resolve()), local=True, trust_remote_code=trust_remote_code)
    if _looks_like_path(target) or path.exists():
        raise CdirError(f"no model folder at {path}: pass an existing folder (hf:/path/to/folder) "
                        "or a hub id (hf:owner/name)")
    return _Source(target, local=False, trust_remote_code=trust_remote_code)


# -- the resolved description of a captioner (config only, no weights) ------------------------

@dataclass
class CaptionerSpec:
    """A captioner resolved from its config: enough to know its key without loading weights."""

    spec: str  # canonical "hf:<hub id or absolute folder>"
    family: str
    params: dict[str, Any]  # prompt, max_new_tokens, min_new_tokens, num_beams
    config: Any = field(repr=False, default=None)
    source: _Source | None = field(repr=False, default=None)

    @property
    def key(self) -> str:
        return captioner_key(self.spec, self.params)

    def load(self, device: str | None = None, dtype: str | torch.dtype | None = None
             ) -> Captioner:
        return _load_model(self, device=device, dtype=dtype)


def captioner_key(spec: str, params: dict[str, Any]) -> str:
    """``spec|k=v,...``, values JSON-encoded, keys sorted: the same settings give the same key."""
    return spec + "|" + ",".join(f"{k}={json.dumps(params[k], ensure_ascii=False)}"
                                 for k in sorted(params))


def resolve_captioner(spec: str, *, prompt: str | None = None,
                      max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS, min_new_tokens: int = 0,
                      num_beams: int = 1, trust_remote_code: bool = False) -> CaptionerSpec:
    """Read the config of ``spec`` (``hf:<hub id or folder>``; the ``hf:`` is optional), detect the
    family and fix the generation parameters (the family's default prompt when none is given)."""
    target = parse_spec(spec, role="captioner").body
    if not target:
        raise CdirError("empty captioner spec: use hf:<hub id or folder>")
    if max_new_tokens < 1 or min_new_tokens < 0 or num_beams < 1 or min_new_tokens > max_new_tokens:
        raise CdirError(f"invalid generation parameters: max_new_tokens={max_new_tokens} (>= 1), "
                        f"min_new_tokens={min_new_tokens} (0..max_new_tokens), "
                        f"num_beams={num_beams} (>= 1)")
    from transformers import AutoConfig

    src = _source(target, trust_remote_code)
    config = src.load(AutoConfig.from_pretrained, "config")
    family = detect_family(config)
    if prompt is not None and not prompt.strip():
        prompt = None
    if family == "vision-encoder-decoder" and prompt is not None:
        raise CdirError(f"{target} ({family}) takes no prompt: leave out --prompt")
    prompt = DEFAULT_PROMPTS[family] if prompt is None else prompt
    if family == "florence2" and re.fullmatch(r"<[A-Z_]+>.*", prompt.strip(), re.S) and \
            prompt.strip() not in FLORENCE_CAPTION_TASKS:
        raise CdirError(f"{prompt.strip()!r} is not a Florence-2 captioning task: use one of "
                        f"{', '.join(FLORENCE_CAPTION_TASKS)}")
    params = {"prompt": prompt, "max_new_tokens": int(max_new_tokens),
              "min_new_tokens": int(min_new_tokens), "num_beams": int(num_beams)}
    return CaptionerSpec(spec="hf:" + src.target, family=family, params=params, config=config,
                         source=src)


# -- the captioner -----------------------------------------------------------------------------

def _clean(text: str, prefixes: Sequence[str] = ()) -> str:
    """One line, single spaces, without a leading echo of the prompt."""
    text = " ".join(text.split())
    low = text.lower()
    for p in sorted({" ".join(p.split()) for p in prefixes if p and p.strip()}, key=len,
                    reverse=True):
        if low.startswith(p.lower()):
            text = text[len(p):].strip()
            break
    return text


class Captioner:
    """A loaded captioning model: ``caption(images) -> captions``, one call per batch."""

    def __init__(self, model: Any, processor: Any, family: str, spec: str, params: dict[str, Any],
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
        self.model = model
        self.processor = processor
        self.family = family
        self.spec = spec
        self.params = dict(params)
        self.device = torch.device(device)
        self.dtype = dtype
        self.tokenizer = getattr(processor, "tokenizer", None)
        if self.tokenizer is None:
            raise CdirError(f"{spec}: the processor has no tokenizer to decode captions with")
        if self.family in ("blip-2", "git", "chat"):
            # decoder-only generation continues the prompt: pad on the left so every row's prompt
            # ends at the same position
            self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token is None and self.tokenizer.eos_token is not None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        gen_config = getattr(model, "generation_config", None)
        if gen_config is not None and gen_config.pad_token_id is None and \
                self.tokenizer.pad_token_id is not None:
            gen_config.pad_token_id = self.tokenizer.pad_token_id  # silences a warning per batch
        if self.family == "blip-2" and getattr(processor, "num_query_tokens", 1) is None:
            # processors saved before transformers 4.46 lack it; without it no <image> tokens are
            # inserted and generation fails
            processor.num_query_tokens = model.config.num_query_tokens
        text_config = getattr(getattr(model, "config", None), "text_config", None)
        self._t5_blip2 = self.family == "blip-2" and bool(
            getattr(text_config, "is_encoder_decoder", False))
        prompt = self.params.get("prompt")
        self._prefixes: list[str] = []
        self._text: str | None = None
        if prompt:
            if self.family == "chat":
                self._text = self._chat_text(prompt)
            else:
                self._text = prompt
                ids = self.tokenizer(prompt, add_special_tokens=False)["input_ids"]
                self._prefixes = [prompt, self.tokenizer.decode(ids, skip_special_tokens=True)]

    @property
    def key(self) -> str:
        return captioner_key(self.spec, self.params)

    def _chat_text(self, instruction: str) -> str:
        if not getattr(self.processor, "chat_template", None):
            raise CdirError(f"{self.spec} ({self.family}) has no chat template in its processor: "
                            "it cannot be prompted as a chat model")
        messages = [{"role": "user", "content": [{"type": "image"},
                                                 {"type": "text", "text": instruction}]}]
        return self.processor.apply_chat_template(messages, add_generation_prompt=True,
                                                  tokenize=False)

    def _inputs(self, images: list) -> Any:
        n = len(images)
        if self.family == "vision-encoder-decoder":
            return self.processor(images=images, return_tensors="pt")
        if self.family == "git" and self._text:
            # GIT continues [CLS] + prompt; the processor's trailing [SEP] would end the caption
            pix = self.processor(images=images, return_tensors="pt")
            ids = self.tokenizer(self._text, add_special_tokens=False)["input_ids"]
            cls = self.tokenizer.cls_token_id
            pix["input_ids"] = torch.tensor([[cls, *ids]] * n, dtype=torch.long)
            return pix
        if self._text is None and self._t5_blip2:
            # an empty prompt, as LAVIS does for Flan-T5: the query tokens plus the tokenizer's
            # EOS. Without input_ids, generate() starts from text_config.bos_token_id, which T5
            # configs lack in transformers 5. (OPT keeps the documented images-only call.)
            return self.processor(images=images, text=[""] * n, return_tensors="pt")
        if self._text is None:
            return self.processor(images=images, return_tensors="pt")
        return self.processor(images=images, text=[self._text] * n, return_tensors="pt",
                              padding=True)

    def _decode(self, out: torch.Tensor, inputs: Any, images: list) -> list[str]:
        input_ids = inputs.get("input_ids") if hasattr(inputs, "get") else None
        if input_ids is not None and out.shape[1] >= input_ids.shape[1] and \
                torch.equal(out[:, : input_ids.shape[1]].cpu(), input_ids.cpu()):
            out = out[:, input_ids.shape[1]:]  # decoder-only models echo their input
        # Florence-2's caption tasks are "pure_text": its post-processing only drops special
        # tokens, which skip_special_tokens does for every family
        texts = self.tokenizer.batch_decode(out, skip_special_tokens=True)
        return [_clean(t, self._prefixes) for t in texts]

    def generate_kwargs(self) -> dict[str, Any]:
        p = self.params
        kw = {"max_new_tokens": p["max_new_tokens"], "num_beams": p["num_beams"],
              "do_sample": False}
        if p.get("min_new_tokens"):
            kw["min_new_tokens"] = p["min_new_tokens"]
        return kw

    @torch.inference_mode()
    def caption(self, images: list) -> list[str]:
        """Captions for a batch of RGB PIL images, in order (an empty string when the model
        generates nothing)."""
        if not images:
            return []
        inputs = self._inputs(images)
        inputs = inputs.to(self.device)
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(self.dtype)
        out = self.model.generate(**inputs, **self.generate_kwargs())
        if not isinstance(out, torch.Tensor):  # a generate output object
            out = out.sequences
        return self._decode(out, inputs, images)


def _model_class(cs: CaptionerSpec):
    import transformers as tf

    family, config = cs.family, cs.config
    if family == "git":
        return tf.AutoModelForCausalLM
    if family == "vision-encoder-decoder":
        return tf.VisionEncoderDecoderModel
    if family == "florence2":
        auto_map = getattr(config, "auto_map", None) or {}
        if cs.source is not None and cs.source.trust_remote_code and \
                "AutoModelForCausalLM" in auto_map:
            return tf.AutoModelForCausalLM  # the original microsoft/Florence-2 remote code
        return tf.Florence2ForConditionalGeneration
    return tf.AutoModelForImageTextToText


def _load_processor(cs: CaptionerSpec):
    import transformers as tf

    src = cs.source
    assert src is not None
    if cs.family == "vision-encoder-decoder":
        # these checkpoints ship an image processor and a tokenizer but usually no processor
        image_processor = src.load(tf.AutoImageProcessor.from_pretrained, "image processor")
        tokenizer = src.load(tf.AutoTokenizer.from_pretrained, "tokenizer")
        return _PairProcessor(image_processor, tokenizer)
    return src.load(tf.AutoProcessor.from_pretrained, "processor")


class _PairProcessor:
    """image processor + tokenizer, for checkpoints without a processor class."""

    def __init__(self, image_processor: Any, tokenizer: Any):
        self.image_processor = image_processor
        self.tokenizer = tokenizer

    def __call__(self, images: list, return_tensors: str = "pt", **_: Any):
        return self.image_processor(images=images, return_tensors=return_tensors)


def _load_model(cs: CaptionerSpec, device: str | torch.device | None = None,
                dtype: str | torch.dtype | None = None) -> Captioner:
    dev = resolve_device(device) if not isinstance(device, torch.device) else device
    dt = resolve_dtype(dev, dtype)
    assert cs.source is not None
    processor = _load_processor(cs)
    cls = _model_class(cs)
    model = cs.source.load(cls.from_pretrained, "model", dtype=dt)
    model.to(dev).eval()
    return Captioner(model, processor, cs.family, cs.spec, cs.params, device=dev, dtype=dt)


def load_captioner(spec: str, device: str | None = None, dtype: str | torch.dtype | None = None,
                   *, trust_remote_code: bool = False, **gen: Any) -> Captioner:
    """Load ``hf:<hub id or folder>`` as a Captioner. ``gen``: prompt, max_new_tokens,
    min_new_tokens, num_beams. Raises ModelUnavailable when the model is neither cached nor
    reachable, CdirError when its family is not supported."""
    return resolve_captioner(spec, trust_remote_code=trust_remote_code, **gen).load(device, dtype)


# -- out-of-memory: halve the batch and go on --------------------------------------------------

def is_oom(exc: BaseException) -> bool:
    """CUDA out of memory, or a CPU allocation failure reported as a RuntimeError."""
    oom_type = getattr(torch.cuda, "OutOfMemoryError", None) or torch.OutOfMemoryError
    if isinstance(exc, oom_type):
        return True
    return isinstance(exc, (RuntimeError, MemoryError)) and (
        isinstance(exc, MemoryError) or "out of memory" in str(exc).lower()
        or "can't allocate memory" in str(exc).lower())


def _free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


class BatchHalver:
    """Runs ``fn`` over items in batches; on out-of-memory halves the batch size (for the rest of
    the run too) and retries. A batch of one that still runs out of memory raises CdirError."""

    def __init__(self, batch_size: int, on_shrink: Callable[[int], None] | None = None,
                 where: str = ""):
        if batch_size < 1:
            raise CdirError(f"batch size must be >= 1, not {batch_size}")
        self.batch_size = int(batch_size)
        self.on_shrink = on_shrink
        self.where = where
        self.shrinks = 0

    def run(self, fn: Callable[[list], list], items: list) -> list:
        out: list = []
        i = 0
        while i < len(items):
            chunk = items[i: i + self.batch_size]
            failed = False
            try:
                result = fn(chunk)
            except Exception as e:  # noqa: BLE001 - anything but OOM is re-raised below
                if not is_oom(e):
                    raise
                failed = True
                if self.batch_size == 1:
                    raise CdirError(
                        f"out of memory with a batch of one image{self.where}: use a smaller "
                        "model, --dtype fp16/bf16, or another device") from None
            if failed:
                # outside the except block, so the traceback's tensors can be freed
                _free_memory()
                self.batch_size = max(1, self.batch_size // 2)
                self.shrinks += 1
                if self.on_shrink:
                    self.on_shrink(self.batch_size)
                continue
            if len(result) != len(chunk):
                raise RuntimeError(f"captioner returned {len(result)} captions for {len(chunk)} "
                                   "images")
            out.extend(result)
            i += len(chunk)
        return out
