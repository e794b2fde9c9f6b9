"""Text encoders: captions -> what a cond=text model is given (docs/text.md).

    text_encoder=hf       a frozen transformers encoder and its tokenizer (one folder or hub id): captions ->
                          embeddings (B, L, hidden) and a padding mask (B, L)
    text_encoder=learned  a word-level tokenizer built on the dataset's captions: captions -> token ids (B, L) and a
                          mask; the encoder is inside the model (LearnedTextEncoder), trained with it

Both pad every caption to `max_length` tokens (fixed shapes), truncate longer ones and count them (`truncated`).
`empty`, the empty caption's encoding, is the unconditional branch of guidance and what caption dropout puts in.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections import Counter
from pathlib import Path

import torch

from stale.utils.hashing import weights_sha256

log = logging.getLogger("stale")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# model_type in the config -> the transformers class that holds only the text tower
ENCODER_CLASSES = {
    "t5": "T5EncoderModel",
    "mt5": "MT5EncoderModel",
    "umt5": "UMT5EncoderModel",
    "clip_text_model": "CLIPTextModel",
    "clip": "CLIPTextModel",
}
PAD, UNK, CLS = "[PAD]", "[UNK]", "[CLS]"


class TextEncoderError(ValueError):
    """A text encoder that cannot be loaded or built as configured; the message names the key and value."""


class _Encoder:
    """What both encoders share: fixed-length padding, the truncation count, the cached empty caption."""

    max_length: int
    truncated: int = 0  # captions cut to max_length so far
    _empty = None

    def tokenize(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def embed(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return ids  # the learned encoder's ids go to the model as they are

    def _count(self, lengths: list[int], captions: list[str]) -> None:
        cut = [(c, n) for c, n in zip(captions, lengths) if n > self.max_length]
        if cut:
            if not self.truncated:
                log.warning(
                    "text_encoder.max_length=%d: caption cut (%d tokens): %.80r; further cuts are counted",
                    self.max_length,
                    cut[0][1],
                    cut[0][0],
                )
            self.truncated += len(cut)

    @torch.no_grad()
    def encode(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(text, mask): embeddings float (B, L, D) (hf) or token ids int64 (B, L) (learned), and bool (B, L)."""
        if isinstance(captions, str):
            raise TypeError("encode takes a list of captions")
        ids, mask = self.tokenize([str(c) for c in captions])
        return self.embed(ids, mask), mask.bool()

    def empty(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The empty caption's encoding (1, L, ...), (1, L): computed once."""
        if self._empty is None:
            self._empty = self.encode([""])
        return self._empty

    def __deepcopy__(self, memo):  # frozen: the EMA callback's copy of the system shares it
        return self


class HFTextEncoder(_Encoder):
    """A frozen transformers text encoder and its tokenizer (the same folder, or its text_encoder/ and tokenizer/
    subfolders as diffusers pipelines lay them out)."""

    name = "hf"

    def __init__(
        self,
        pretrained: str,
        max_length: int = 77,
        dtype: str = "float32",
        subfolder: str | None = None,
        tokenizer_subfolder: str | None = None,
        sha256: str | None = None,
        device="cpu",
    ):
        if not pretrained:
            raise TextEncoderError("text_encoder=hf needs text_encoder.pretrained=<a folder or hub id>")
        if dtype not in DTYPES:
            raise TextEncoderError(f"text_encoder.dtype={dtype!r} is not one of {tuple(DTYPES)}")
        if not isinstance(max_length, int) or max_length < 1:
            raise TextEncoderError(f"text_encoder.max_length={max_length!r} must be an integer >= 1")
        try:
            import transformers
        except ImportError as e:
            raise TextEncoderError(f"text_encoder=hf needs transformers: pip install 'stale[text]' ({e})") from None
        self.max_length = max_length
        where = f"text_encoder.pretrained={pretrained!r}"
        try:
            config = transformers.AutoConfig.from_pretrained(pretrained, subfolder=subfolder or "")
            cls = getattr(transformers, ENCODER_CLASSES.get(config.model_type, "AutoModel"))
            self.model = cls.from_pretrained(pretrained, subfolder=subfolder or "", dtype=DTYPES[dtype])
            self.tokenizer = transformers.AutoTokenizer.from_pretrained(
                pretrained, subfolder=tokenizer_subfolder if tokenizer_subfolder is not None else (subfolder or "")
            )
        except (OSError, ValueError, KeyError) as e:
            raise TextEncoderError(f"{where}: cannot load a text encoder and its tokenizer ({e})") from None
        self.model = self.model.eval().requires_grad_(False).to(device)
        self.dim = int(self.model.config.hidden_size)
        digest = weights_sha256(self.model)
        if sha256 and sha256 != digest:
            raise TextEncoderError(
                f"{where} holds other weights (sha256 {digest[:12]}...) than the ones recorded ({sha256[:12]}...)"
            )
        self.source = {
            "name": "hf",
            "pretrained": str(pretrained),
            "subfolder": subfolder,
            "tokenizer_subfolder": tokenizer_subfolder,
            "dtype": dtype,
            "max_length": max_length,
            "sha256": digest,
            "class": type(self.model).__name__,
        }

    def to(self, device) -> "HFTextEncoder":
        self.model.to(device)
        self._empty = None if self._empty is None else tuple(t.to(device) for t in self._empty)
        return self

    def tokenize(self, captions):
        lengths = [len(i) for i in self.tokenizer(captions, truncation=False)["input_ids"]]
        self._count(lengths, captions)
        out = self.tokenizer(
            captions, padding="max_length", truncation=True, max_length=self.max_length, return_tensors="pt"
        )
        return out["input_ids"], out["attention_mask"]

    def embed(self, ids, mask):
        device = next(self.model.parameters()).device
        hidden = self.model(input_ids=ids.to(device), attention_mask=mask.to(device)).last_hidden_state
        return hidden.float()  # (B, L, D): the model casts to its own dtype

    def save(self, out: str | Path) -> Path:
        """The encoder and its tokenizer in one folder: an export's own copy."""
        self.model.save_pretrained(str(out), safe_serialization=True)
        self.tokenizer.save_pretrained(str(out))
        return Path(out)


class LearnedTokenizer(_Encoder):
    """text_encoder=learned: a word-level tokenizer (lower-cased, split on whitespace and punctuation) over `words`,
    [CLS] first (so the empty caption has one token), unknown words as [UNK]."""

    name = "learned"

    def __init__(
        self,
        words: list[str] | None = None,
        max_length: int = 16,
        max_words: int = 5000,
        vocab_captions: int = 100_000,
        layers: int = 2,
        sha256: str | None = None,
    ):
        """words: the vocabulary (stale-train builds it from up to vocab_captions training captions, the max_words
        commonest words: build_vocabulary); layers: the Transformer blocks of the encoder inside the model; sha256:
        the vocabulary's hash when it was recorded (a checkpoint's, an export's), checked."""
        if not words:
            raise TextEncoderError(
                "text_encoder=learned has no vocabulary (text_encoder.words): stale-train builds "
                "it from the training captions"
            )
        _require_tokenizers()
        from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

        if not isinstance(max_length, int) or max_length < 2:
            raise TextEncoderError(f"text_encoder.max_length={max_length!r} must be an integer >= 2")
        self.words, self.max_length = list(words), max_length
        vocab = {w: i for i, w in enumerate([PAD, UNK, CLS, *self.words])}
        tok = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
        tok.normalizer = normalizers.Lowercase()
        tok.pre_tokenizer = pre_tokenizers.Whitespace()
        tok.post_processor = processors.TemplateProcessing(single=f"{CLS} $A", special_tokens=[(CLS, vocab[CLS])])
        self.tokenizer = tok
        self.vocab_size = len(vocab)
        self.max_words, self.vocab_captions, self.layers = max_words, vocab_captions, layers
        digest = hashlib.sha256(json.dumps(self.words).encode()).hexdigest()
        if sha256 and sha256 != digest:
            raise TextEncoderError(
                f"text_encoder.words: this vocabulary (sha256 {digest[:12]}...) is not the one "
                f"recorded ({sha256[:12]}...)"
            )
        self.source = {"name": "learned", "words": self.words, "max_length": max_length, "sha256": digest}

    def to(self, device) -> "LearnedTokenizer":
        return self

    def tokenize(self, captions):
        encs = self.tokenizer.encode_batch(captions)
        self._count([len(e.ids) for e in encs], captions)
        ids = torch.zeros(len(captions), self.max_length, dtype=torch.long)  # [PAD] = 0
        for i, e in enumerate(encs):
            row = e.ids[: self.max_length]
            ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        return ids, ids != 0


def build_vocabulary(captions, max_words: int = 5000) -> list[str]:
    """The `max_words` commonest words of the captions (ties in alphabetical order), as LearnedTokenizer splits them."""
    _require_tokenizers()
    from tokenizers import normalizers, pre_tokenizers

    norm, pre = normalizers.Lowercase(), pre_tokenizers.Whitespace()
    counts = Counter(w for c in captions for w, _ in pre.pre_tokenize_str(norm.normalize_str(str(c))))
    return [w for w, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:max_words]]


def _require_tokenizers() -> None:
    try:
        import tokenizers  # noqa: F401
    except ImportError as e:
        raise TextEncoderError(
            f"text_encoder=learned needs the tokenizers package: pip install 'stale[text]' ({e})"
        ) from None


TARGETS = {"stale.text.encoders.HFTextEncoder": "hf", "stale.text.encoders.LearnedTokenizer": "learned"}


def text_encoder_kind(node) -> str | None:
    """hf, learned or None (no text encoder) of a text_encoder node: a config's (`_target_`, or empty for
    text_encoder=none), an export's or a run config from before the nodes had targets (`name`)."""
    if not node:
        return None
    target = node.get("_target_")
    if target is not None:
        if target not in TARGETS:
            raise TextEncoderError(f"text_encoder._target_={target!r} is not one of {sorted(TARGETS)}")
        return TARGETS[target]
    name = node.get("name", "none")
    if name not in ("none", None, "hf", "learned"):
        raise TextEncoderError(f"text_encoder.name={name!r} is not one of none, hf, learned")
    return None if name in ("none", None) else name


def load_text_encoder(node: dict | None, device="cpu", folder: str | Path | None = None):
    """A text_encoder node (a run config's, a stale-encode cache's or an export's: text_encoder_kind) ->
    HFTextEncoder, LearnedTokenizer, or None. `folder` replaces the recorded pretrained (an export's own copy)."""
    name = text_encoder_kind(node)
    node = {k: v for k, v in (node or {}).items() if k not in ("_target_", "name")}
    if name is None:
        return None
    if name == "hf":
        if folder is not None:
            node.update(pretrained=str(folder), subfolder=None, tokenizer_subfolder=None)
        keys = ("pretrained", "max_length", "dtype", "subfolder", "tokenizer_subfolder", "sha256")
        return HFTextEncoder(**{k: node[k] for k in keys if node.get(k) is not None}, device=device)
    return LearnedTokenizer(node.get("words"), int(node.get("max_length", 16)))
