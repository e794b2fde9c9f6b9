"""Tiny random-init transformers text encoders saved to folders, loaded through stale's own code (no downloads).

T5: ByT5Tokenizer needs no vocabulary file; the embedding is sized with len(tokenizer) (384), which is larger than
tokenizer.vocab_size (256: the byte ids without the special and extra tokens). CLIP: a word-level tokenizer built
with `tokenizers`, wrapped as a PreTrainedTokenizerFast so that AutoTokenizer loads it from the folder.
"""

from __future__ import annotations

from pathlib import Path

import torch

WORDS = ["a", "red", "green", "blue", "yellow", "square", "disc", "triangle", "cross", "moving", "left", "right", "up",
         "down"]


def save_tiny_t5(folder: Path, seed: int = 0) -> Path:
    from transformers import ByT5Tokenizer, T5Config, T5EncoderModel

    tok = ByT5Tokenizer()
    torch.manual_seed(seed)
    model = T5EncoderModel(T5Config(vocab_size=len(tok), d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2,
                                    pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id))
    model.save_pretrained(str(folder))
    tok.save_pretrained(str(folder))
    return folder


def save_tiny_umt5(folder: Path, seed: int = 0) -> Path:
    """Wan's text encoder family (UMT5), tiny and random, with a T5 tokenizer (Unigram, as T5's sentencepiece
    model) built with `tokenizers` over the test words: a real UMT5 folder holds the same tokenizer class."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import T5TokenizerFast, UMT5Config, UMT5EncoderModel

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [("\u2581" + w, -1.0) for w in WORDS]
    tok = Tokenizer(models.Unigram(pieces, unk_id=2))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    fast = T5TokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                           extra_ids=0)
    torch.manual_seed(seed)
    model = UMT5EncoderModel(UMT5Config(vocab_size=len(pieces), d_model=16, d_kv=8, d_ff=32, num_layers=1,
                                        num_heads=2, pad_token_id=0, eos_token_id=1))
    model.save_pretrained(str(folder))
    fast.save_pretrained(str(folder))
    return folder


def save_tiny_clip(folder: Path, seed: int = 0) -> Path:
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import CLIPTextConfig, CLIPTextModel, PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<pad>", "<unk>", "<s>", "</s>", *WORDS])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A </s>", special_tokens=[("<s>", 2), ("</s>", 3)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>")
    torch.manual_seed(seed)
    model = CLIPTextModel(CLIPTextConfig(vocab_size=len(vocab), hidden_size=16, intermediate_size=32,
                                         num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=32,
                                         pad_token_id=0, bos_token_id=2, eos_token_id=3))
    model.save_pretrained(str(folder))
    fast.save_pretrained(str(folder))
    return folder


def tiny_text_encoder(tmp_path_factory, kind: str) -> Path:
    """One saved folder per kind ("t5", "umt5" or "clip") for the whole session."""
    folder = Path(tmp_path_factory.getbasetemp()) / f"text-{kind}"
    if not (folder / "config.json").is_file():
        {"t5": save_tiny_t5, "umt5": save_tiny_umt5, "clip": save_tiny_clip}[kind](folder)
    return folder
