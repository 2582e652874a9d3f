"""Tiny, randomly initialised models built from configs: captioners saved with working processors,
and an open_clip config (TINY_CLIP).

Each builder writes a complete model folder (config, weights, processor, tokenizer) that loads with
`from_pretrained(folder)` under HF_HUB_OFFLINE=1, exactly like a downloaded checkpoint, so the real
loading and generation code paths run in tests. Weights are random: captions are gibberish, so tests
pass `min_new_tokens` to rule out empty strings.

Usage: `tiny_model_path(family)` (built once per process, cached), `build_tiny(family, folder)`,
`build_all(root)`; spec strings are then `hf:<folder>`. Families: FAMILIES.
"""

from __future__ import annotations

import atexit
import functools
import json
import shutil
import tempfile
from pathlib import Path

# Words the hand-built WordPiece vocabularies know; anything else becomes [UNK].
WORDS = (
    "a an the of in on with and is are this that picture photo image painting drawing sketch "
    "cat dog car house tree bird person object main describe short sentence one what does "
    "show shows red blue green small large . , ? :"
).split()

FAMILIES = ("blip", "blip-2", "blip-2-t5", "git", "florence2", "llava", "llava_next",
            "vision-encoder-decoder")

# A minimal chat template in the LLaVA-1.5 style: "USER: <image>\n{text} ASSISTANT:".
CHAT_TEMPLATE = (
    "{% for m in messages %}"
    "{{ m['role'].upper() }}: "
    "{% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}<image>\n"
    "{% elif c['type'] == 'text' %}{{ c['text'] }} {% endif %}"
    "{% endfor %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


def _wordpiece(extra_special: tuple[str, ...] = ()):
    """A BERT tokenizer over WORDS: [PAD]=0 [UNK]=1 [CLS]=2 [SEP]=3 [MASK]=4, then extras."""
    from transformers import BertTokenizer

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *extra_special]
    vocab = {t: i for i, t in enumerate(specials + WORDS)}
    return BertTokenizer(vocab=vocab)


def _byte_level_vocab(specials: list[str]) -> dict[str, int]:
    """Specials first, then the 256 byte-level symbols: any text tokenizes, one token per byte."""
    vocab = {t: i for i, t in enumerate(specials)}
    for ch in _byte_symbols():
        vocab.setdefault(ch, len(vocab))
    return vocab


def _byte_symbols() -> list[str]:
    """The printable stand-ins byte-level BPE uses for the 256 byte values (GPT-2's scheme:
    printable Latin-1 bytes map to themselves, the others to code points from 256 upwards)."""
    keep = [*range(33, 127), *range(161, 173), *range(174, 256)]
    out, extra = [], 0
    for b in range(256):
        if b in keep:
            out.append(chr(b))
        else:
            out.append(chr(256 + extra))
            extra += 1
    return out


def _metaspace_bpe(specials: list[str]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """A Llama-style (metaspace) BPE over WORDS: single characters, plus left-to-right merges that
    rebuild each "\u2581word", so the chat prompt and generated words decode with their spaces."""
    vocab = {t: i for i, t in enumerate(specials)}
    chars = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,?:!'\n\u2581"
    for ch in chars:
        vocab.setdefault(ch, len(vocab))
    merges: list[tuple[str, str]] = []
    for word in WORDS + ["USER", "ASSISTANT", "Describe"]:
        piece = "\u2581"
        for ch in word:
            if piece + ch not in vocab:
                vocab[piece + ch] = len(vocab)
                merges.append((piece, ch))
            piece += ch
    return vocab, merges


def _vision(**over) -> dict:
    base = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                image_size=32, patch_size=8)
    base.update(over)
    return base


def build_blip(folder: Path) -> Path:
    from transformers import (
        BlipConfig,
        BlipForConditionalGeneration,
        BlipImageProcessor,
        BlipProcessor,
    )

    tok = _wordpiece(("[DEC]",))
    tok.add_special_tokens({"bos_token": "[DEC]"})
    dec, sep, pad = (tok.convert_tokens_to_ids(t) for t in ("[DEC]", "[SEP]", "[PAD]"))
    config = BlipConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=64,
                         bos_token_id=dec, eos_token_id=sep, sep_token_id=sep, pad_token_id=pad),
        vision_config=_vision(),
        projection_dim=32,
    )
    model = BlipForConditionalGeneration(config).eval()
    ip = BlipImageProcessor(size={"height": 32, "width": 32})
    BlipProcessor(ip, tok).save_pretrained(folder)
    model.save_pretrained(folder)
    return folder


def build_blip2(folder: Path, language_model: str = "opt") -> Path:
    """BLIP-2 over a tiny OPT (decoder-only: generate echoes the prompt) or Flan-T5
    (encoder-decoder: it does not)."""
    from transformers import (
        Blip2Config,
        Blip2ForConditionalGeneration,
        Blip2Processor,
        BlipImageProcessor,
        GPT2Tokenizer,
    )

    if language_model == "opt":
        specials = ["<s>", "<pad>", "</s>", "<unk>"]
        tok = GPT2Tokenizer(vocab=_byte_level_vocab(specials), merges=[], bos_token="</s>",
                            eos_token="</s>", pad_token="<pad>", unk_token="</s>")
    else:  # T5's layout: <pad>=0 (also the decoder start), </s>=1
        specials = ["<pad>", "</s>", "<unk>"]
        tok = GPT2Tokenizer(vocab=_byte_level_vocab(specials), merges=[], bos_token=None,
                            eos_token="</s>", pad_token="<pad>", unk_token="<unk>")
    n_query = 4
    proc = Blip2Processor(BlipImageProcessor(size={"height": 32, "width": 32}), tok,
                          num_query_tokens=n_query)  # adds the <image> token to the tokenizer
    image_id = tok.convert_tokens_to_ids("<image>")
    if language_model == "opt":
        text_config = dict(model_type="opt", vocab_size=len(tok), hidden_size=32,
                           num_hidden_layers=2, ffn_dim=64, num_attention_heads=2,
                           max_position_embeddings=128, word_embed_proj_dim=32,
                           bos_token_id=2, eos_token_id=2, pad_token_id=1)
    else:
        text_config = dict(model_type="t5", vocab_size=len(tok), d_model=32, d_kv=16, d_ff=64,
                           num_layers=2, num_decoder_layers=2, num_heads=2,
                           feed_forward_proj="gated-gelu", decoder_start_token_id=0,
                           pad_token_id=0, eos_token_id=1, tie_word_embeddings=False)
    config = Blip2Config(
        vision_config=_vision(),
        qformer_config=dict(vocab_size=64, hidden_size=32, num_hidden_layers=2,
                            num_attention_heads=2, intermediate_size=64, encoder_hidden_size=32,
                            max_position_embeddings=64),
        text_config=text_config,
        num_query_tokens=n_query,
        image_token_index=image_id,
    )
    model = Blip2ForConditionalGeneration(config).eval()
    if language_model != "opt":
        import torch

        with torch.no_grad():  # random T5 heads like <pad>; a real one never generates it
            model.get_output_embeddings().weight[tok.pad_token_id].fill_(0.0)
    proc.save_pretrained(folder)
    model.save_pretrained(folder)
    return folder


def build_git(folder: Path) -> Path:
    from transformers import CLIPImageProcessor, GitConfig, GitForCausalLM, GitProcessor

    tok = _wordpiece()
    cls, sep, pad = (tok.convert_tokens_to_ids(t) for t in ("[CLS]", "[SEP]", "[PAD]"))
    config = GitConfig(
        vision_config=_vision(),
        vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=64,
        bos_token_id=cls, eos_token_id=sep, pad_token_id=pad,
    )
    model = GitForCausalLM(config).eval()
    ip = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    GitProcessor(ip, tok).save_pretrained(folder)
    model.save_pretrained(folder)
    return folder


def build_florence2(folder: Path) -> Path:
    import torch
    from transformers import (
        BartTokenizer,
        CLIPImageProcessor,
        Florence2Config,
        Florence2ForConditionalGeneration,
        Florence2Processor,
    )

    specials = ["<s>", "<pad>", "</s>", "<unk>", "<image>"]
    tok = BartTokenizer(vocab=_byte_level_vocab(specials), merges=[],
                        extra_special_tokens={"image_token": "<image>"})
    image_id = tok.convert_tokens_to_ids("<image>")
    config = Florence2Config(
        text_config=dict(model_type="bart", vocab_size=len(tok), max_position_embeddings=128,
                         encoder_layers=1, encoder_ffn_dim=64, encoder_attention_heads=2,
                         decoder_layers=1, decoder_ffn_dim=64, decoder_attention_heads=2,
                         d_model=32, bos_token_id=0, pad_token_id=1, eos_token_id=2,
                         decoder_start_token_id=2, forced_eos_token_id=2),
        vision_config=dict(depths=[1], patch_size=[7], patch_stride=[4], patch_padding=[3],
                           patch_prenorm=[False], embed_dim=[32], num_heads=[2], num_groups=[2],
                           window_size=4, projection_dim=32, drop_path_rate=0.0),
        image_token_id=image_id,
    )
    model = Florence2ForConditionalGeneration(config).eval()
    # The number of image tokens the processor inserts must equal what the vision tower emits.
    with torch.no_grad():
        n_tokens = model.get_image_features(torch.zeros(1, 3, 32, 32)).pooler_output.shape[1]
    ip = CLIPImageProcessor(size={"height": 32, "width": 32}, crop_size={"height": 32, "width": 32},
                            do_center_crop=False)
    ip.image_seq_length = n_tokens
    # the real checkpoints' post-processor settings that the caption tasks use
    post = {"pure_text": {}, "description_with_bboxes": {}, "bboxes": {}, "polygons": {}}
    Florence2Processor(ip, tok, post_processor_config=post).save_pretrained(folder)
    model.save_pretrained(folder)
    return folder


def build_llava(folder: Path) -> Path:
    from transformers import (
        CLIPImageProcessor,
        LlamaTokenizer,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    vocab, merges = _metaspace_bpe(["<unk>", "<s>", "</s>", "<image>"])
    tok = LlamaTokenizer(vocab=vocab, merges=merges,
                         extra_special_tokens={"image_token": "<image>"})
    tok.pad_token = "<unk>"
    image_id = tok.convert_tokens_to_ids("<image>")
    config = LlavaConfig(
        vision_config=dict(model_type="clip_vision_model", **_vision(), projection_dim=32),
        text_config=dict(model_type="llama", vocab_size=len(tok), hidden_size=32,
                         intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=2, max_position_embeddings=128,
                         bos_token_id=1, eos_token_id=2, pad_token_id=0),
        image_token_index=image_id,
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
    )
    model = LlavaForConditionalGeneration(config).eval()
    ip = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    proc = LlavaProcessor(ip, tok, patch_size=8, vision_feature_select_strategy="default",
                          num_additional_image_tokens=1, chat_template=CHAT_TEMPLATE)
    proc.save_pretrained(folder)
    model.save_pretrained(folder)
    return folder


def build_llava_next(folder: Path) -> Path:
    """LLaVA-NeXT: images are tiled by aspect ratio, so images of different shapes get different
    numbers of image tokens and a batch needs (left) padding."""
    from transformers import (
        LlamaTokenizer,
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
        LlavaNextImageProcessor,
        LlavaNextProcessor,
    )

    vocab, merges = _metaspace_bpe(["<unk>", "<s>", "</s>", "<image>"])
    tok = LlamaTokenizer(vocab=vocab, merges=merges,
                         extra_special_tokens={"image_token": "<image>"})
    tok.pad_token = "<unk>"
    pinpoints = [[32, 64], [64, 32], [64, 64]]
    config = LlavaNextConfig(
        vision_config=dict(model_type="clip_vision_model", **_vision(), projection_dim=32),
        text_config=dict(model_type="llama", vocab_size=len(tok), hidden_size=32,
                         intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=2, max_position_embeddings=256,
                         bos_token_id=1, eos_token_id=2, pad_token_id=0),
        image_token_index=tok.convert_tokens_to_ids("<image>"),
        image_grid_pinpoints=pinpoints,
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
    )
    model = LlavaNextForConditionalGeneration(config).eval()
    ip = LlavaNextImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32},
                                 image_grid_pinpoints=pinpoints)
    proc = LlavaNextProcessor(ip, tok, patch_size=8, vision_feature_select_strategy="default",
                              num_additional_image_tokens=1, chat_template=CHAT_TEMPLATE)
    proc.save_pretrained(folder)
    model.save_pretrained(folder)
    return folder


def build_vit_gpt2(folder: Path) -> Path:
    """A vision encoder-decoder (ViT + GPT-2) saved like nlpconnect/vit-gpt2-image-captioning:
    image processor and tokenizer, no processor class."""
    from transformers import (
        GPT2Config,
        GPT2Tokenizer,
        VisionEncoderDecoderConfig,
        VisionEncoderDecoderModel,
        ViTConfig,
        ViTImageProcessor,
    )

    tok = GPT2Tokenizer(vocab=_byte_level_vocab(["<|endoftext|>"]), merges=[])
    eos = tok.convert_tokens_to_ids("<|endoftext|>")
    config = VisionEncoderDecoderConfig.from_encoder_decoder_configs(
        ViTConfig(**_vision()),
        GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=2, n_head=2, n_positions=64,
                   bos_token_id=eos, eos_token_id=eos),
    )
    config.decoder_start_token_id = eos
    config.pad_token_id = eos
    config.eos_token_id = eos
    model = VisionEncoderDecoderModel(config=config).eval()
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(folder)
    tok.save_pretrained(folder)
    model.save_pretrained(folder)
    return folder


BUILDERS = {"blip": build_blip, "blip-2": build_blip2,
            "blip-2-t5": lambda folder: build_blip2(folder, "t5"), "git": build_git,
            "florence2": build_florence2, "llava": build_llava, "llava_next": build_llava_next,
            "vision-encoder-decoder": build_vit_gpt2}


def build_tiny(family: str, folder: str | Path) -> Path:
    """Build the tiny model of ``family`` into ``folder`` (seeded: reproducible weights)."""
    import torch

    torch.manual_seed(0)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    return BUILDERS[family](folder)


def build_all(root: str | Path) -> dict[str, Path]:
    return {f: build_tiny(f, Path(root) / f) for f in FAMILIES}


_ROOT: list[Path] = []


@functools.cache
def tiny_model_path(family: str) -> Path:
    """The folder of the tiny ``family`` model, built once per test process (in a temporary
    folder removed at exit), so test modules share the models without sharing fixtures."""
    if not _ROOT:
        _ROOT.append(Path(tempfile.mkdtemp(prefix="cdir-tiny-models-")))
        atexit.register(shutil.rmtree, _ROOT[0], True)
    return build_tiny(family, _ROOT[0] / family)


# A tiny CLIP: ViT 64 px / patch 16 / width 64 / 2 layers; text width 64 / 2 layers with the real
# 77-token context and 49408-token vocabulary, so open_clip's bundled BPE tokenizer works.
TINY_CLIP = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 64, "layers": 2, "width": 64, "patch_size": 16,
                   "head_width": 32},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}


def write_tiny_clip_config(folder: Path, name: str = "cdir-tiny-clip") -> Path:
    path = Path(folder) / f"{name}.json"
    path.write_text(json.dumps(TINY_CLIP))
    return path


# A ResNet-18 at 1/8 width with the small stem: the tiny encoder of the adaptation tests.
TINY_RESNET = {"name": "resnet18", "kwargs": {"width": 0.125, "small_stem": True}}


def write_tiny_encoder(path: Path) -> Path:
    """An untrained TINY_RESNET encoder file with 32 px input settings, as `cdir train` exports
    it (seeded, so every call writes the same weights)."""
    import torch

    from encoders.engine.checkpoint import export_encoder
    from encoders.zoo.backbones import build_backbone

    torch.manual_seed(0)
    net, _ = build_backbone(TINY_RESNET["name"], **TINY_RESNET["kwargs"])
    ckpt = {"method": "moco", "encoder_arch": TINY_RESNET, "encoder_prefix": "",
            "config": {"aug": {"size": 32, "eval_resize": 1.0, "blur_p": 0.0}},
            "model": net.state_dict(), "epoch": 0}
    return export_encoder(ckpt, path)
