"""The Grok-1 tokenizer: a thin wrapper over SentencePiece, and an incremental text decoder.

The release ships a SentencePiece BPE model (`tokenizer.model`, 131072 pieces, SPEC.md §6) with
`[PAD]`=0, `[BOS]`=1, `[EOS]`=2, `[UNK]`=3 and byte-fallback pieces `<0x00>`..`<0xFF>`. Prompts
are encoded WITHOUT a BOS, exactly as the release's runner does.

`StreamDecoder` turns generated ids into text one id at a time. Byte-fallback tokens mean one
character may span several ids (an emoji is four `<0x..>` pieces), and SentencePiece drops the
leading "▁" of the first piece of a sequence, so decoding ids one by one is wrong. The decoder
instead re-decodes a short window of recent ids and emits the part of its text that can no
longer change.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable

import sentencepiece

TOKENIZER_FILE = "tokenizer.model"
_REPLACEMENT = "\ufffd"  # what SentencePiece decodes an invalid or incomplete UTF-8 byte to


class Tokenizer:
    """A SentencePiece tokenizer with the release's conventions (no BOS on encode)."""

    def __init__(self, processor: sentencepiece.SentencePieceProcessor):
        self._sp = processor

    @classmethod
    def load(cls, path: str | os.PathLike) -> Tokenizer:
        """Loads a `tokenizer.model` file, or the one inside directory `path`."""
        path = os.fspath(path)
        if os.path.isdir(path):
            path = os.path.join(path, TOKENIZER_FILE)
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"Tokenizer model not found at {path!r}. Download `{TOKENIZER_FILE}` from the "
                "Grok-1 release (https://github.com/xai-org/grok-1) and put it at that path, or "
                "pass the path where it is."
            )
        try:
            return cls(sentencepiece.SentencePieceProcessor(model_file=path))
        except RuntimeError as e:  # SentencePiece's only error type, for every bad file
            raise ValueError(
                f"{path} is not a SentencePiece model file ({e}); the Grok-1 tokenizer is the "
                f"release's `{TOKENIZER_FILE}` (the demo model's sits beside its checkpoint)"
            ) from None

    @property
    def vocab_size(self) -> int:
        """Number of pieces V."""
        return self._sp.vocab_size()

    @property
    def pad_id(self) -> int:
        return self._sp.pad_id()

    @property
    def eos_id(self) -> int:
        return self._sp.eos_id()

    @property
    def bos_id(self) -> int:
        return self._sp.bos_id()

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, without BOS or EOS (as the release encodes prompts)."""
        if not isinstance(text, str):
            raise TypeError(f"Tokenizer.encode expects a str, got {type(text).__name__}")
        return self._sp.encode(text)

    @property
    def special_pieces(self) -> dict[str, int]:
        """{piece: id} of the control pieces a text may name: [PAD], [BOS], [EOS] (those the
        model defines)."""
        ids = (self.pad_id, self.bos_id, self.eos_id)
        return {self._sp.id_to_piece(i): i for i in ids if 0 <= i < self.vocab_size}

    def encode_with_special(self, text: str) -> list[int]:
        """Like `encode`, but the control pieces written in `text` ("[BOS]", "[EOS]", "[PAD]")
        become their ids; the text between them is encoded piece by piece with `encode`.

        SentencePiece's own encode never produces a control id (it spells "[EOS]" out as
        "[", "E", "O", "S", "]"); clients that count tokens on the server (such as
        lm-evaluation-harness, which looks up the EOS id by encoding "[EOS]") need them mapped.
        """
        if not isinstance(text, str):
            raise TypeError(f"Tokenizer.encode expects a str, got {type(text).__name__}")
        special = self.special_pieces
        if not special:
            return self.encode(text)
        pattern = "|".join(re.escape(p) for p in sorted(special, key=len, reverse=True))
        ids: list[int] = []
        for i, part in enumerate(re.split(f"({pattern})", text)):
            if i % 2:  # re.split puts the matched separators at the odd positions
                ids.append(special[part])
            elif part:
                ids += self._sp.encode(part)
        return ids

    def decode(self, ids: Iterable[int]) -> str:
        """Text of token ids; control tokens ([PAD], [BOS], [EOS]) decode to nothing."""
        ids = [int(i) for i in ids]
        vocab_size = self.vocab_size
        for i in ids:
            if not 0 <= i < vocab_size:
                raise ValueError(f"Token id {i} is out of range: the vocabulary has {vocab_size}.")
        return self._sp.decode(ids)

    def id_to_piece(self, token_id: int) -> str:
        """The piece string of one id, e.g. "▁The" or "<0xE6>"."""
        return self._sp.id_to_piece(int(token_id))

    def is_control(self, token_id: int) -> bool:
        """Whether `token_id` is a control piece, which decodes to no text."""
        return self._sp.is_control(int(token_id))

    def check_vocab(self, vocab_size: int) -> None:
        """Raises ValueError if this tokenizer's size differs from the model's `vocab_size`."""
        if self.vocab_size != vocab_size:
            raise ValueError(
                f"The tokenizer does not match the model: the tokenizer has {self.vocab_size} "
                f"pieces but the model's vocab_size is {vocab_size}. Use the `{TOKENIZER_FILE}` "
                "that belongs to the checkpoint."
            )

    def stream_decoder(self) -> StreamDecoder:
        """A fresh `StreamDecoder` over this tokenizer."""
        return StreamDecoder(self)


class StreamDecoder:
    """Incremental detokenizer: `feed` ids one at a time, get back the text they complete.

    The concatenation of every `feed` result and a final `flush()` equals `decode(all_ids)`.

    Invariants, with ids[p:r] the context window and ids[r:] the ids not yet emitted:
      * the text of ids[:r] has been emitted, and its decode does not end in an incomplete
        UTF-8 sequence (U+FFFD), so later byte pieces cannot change it;
      * p == 0, or ids[p:r] alone decodes to non-empty text. SentencePiece strips the leading
        "▁" only until the first piece that yields text, so decoding ids[p:] strips inside the
        context, and the text after the context is what the full decode has there.
    Each `feed` decodes only ids[p:], which is a few ids long, so streaming costs O(total).
    """

    def __init__(self, tokenizer: Tokenizer):
        self._tok = tokenizer
        self._ids: list[int] = []
        self._p = 0  # start of the context window
        self._r = 0  # end of the emitted ids
        self._context = ""  # decode(ids[p:r])
        self._emitted = 0  # characters emitted so far (only used by the fallback)

    @property
    def ids(self) -> list[int]:
        """All ids fed so far."""
        return list(self._ids)

    def feed(self, token_id: int) -> str:
        """Adds one id; returns the newly completed text (often "", never a partial char)."""
        token_id = int(token_id)
        if not 0 <= token_id < self._tok.vocab_size:
            raise ValueError(
                f"Token id {token_id} is out of range: the vocabulary has {self._tok.vocab_size}."
            )
        self._ids.append(token_id)
        return self._advance(final=False)

    def flush(self) -> str:
        """Returns the remaining held-back text (U+FFFD for bytes that never completed)."""
        return self._advance(final=True)

    def _advance(self, final: bool) -> str:
        ids, r = self._ids, self._r
        text = self._tok.decode(ids[self._p :])
        if not text.startswith(self._context):  # not expected; recover from the full decode
            return self._advance_from_start(final)
        if text.endswith(_REPLACEMENT) and not final:
            return ""  # may be the start of a multi-byte character: wait for more ids
        new = text[len(self._context) :]
        # Slide the window to the new ids if they alone decode to some text: then SentencePiece
        # is past its leading-"▁" stripping by the end of them.
        candidate = self._tok.decode(ids[r:])
        if candidate:
            self._p, self._context = r, candidate
        else:
            self._context = text
        self._r = len(ids)
        self._emitted += len(new)
        return new

    def _advance_from_start(self, final: bool) -> str:
        text = self._tok.decode(self._ids)
        if text.endswith(_REPLACEMENT) and not final:
            return ""
        self._p, self._r, self._context = 0, len(self._ids), text
        new = text[self._emitted :]
        self._emitted = len(text)
        return new
