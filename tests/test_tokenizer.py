"""Tests for grok1.tokenizer: the release's golden encodings and streaming decode.

The release's `tokenizer.model` is never copied into the repo. Tests that need it find it via
$GROK1_TOKENIZER or at `../shared/tokenizer/tokenizer.model` relative to the repo root, and skip
when it is absent. A tiny byte-fallback SentencePiece model trained here covers `StreamDecoder`
without it.
"""

import json
import os
import pathlib
import random

import pytest
import sentencepiece

from grok1.tokenizer import StreamDecoder, Tokenizer

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
DEFAULT_REAL_PATH = REPO_ROOT.parent / "shared" / "tokenizer" / "tokenizer.model"

SPEC_PROMPT = "The answer to life the universe and everything is of course"
SPEC_IDS = [422, 3033, 356, 1180, 333, 9072, 360, 2175, 391, 359, 1805]

STREAM_TEXTS = [
    "I love pizza 🍕🍕 and cats 🐱! 👍🏽 family: 👨‍👩‍👧 flag: 🇫🇷",
    "人工智能正在改变世界。我们今天去北京吧！",
    "こんにちは、世界。안녕하세요 세계",
    "café naïve résumé Ærøskøbing Ångström",
    "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 ꙮ \u0007 🧬",
    "   leading and trailing spaces   ",
    "def f(x):\n    return x  # ok\n\n",
]


def _real_path() -> pathlib.Path:
    return pathlib.Path(os.environ.get("GROK1_TOKENIZER", DEFAULT_REAL_PATH))


@pytest.fixture(scope="module")
def real_tok() -> Tokenizer:
    path = _real_path()
    if not path.is_file():
        pytest.skip(f"release tokenizer.model not found at {path} (set $GROK1_TOKENIZER)")
    return Tokenizer.load(path)


@pytest.fixture(scope="module")
def tiny_tok(tmp_path_factory) -> Tokenizer:
    """A ~300-piece byte-fallback BPE model with the release's special ids."""
    tmp = tmp_path_factory.mktemp("tiny_spm")
    rng = random.Random(0)
    words = "the cat sat on a mat and then ran to see its friend dog who was at home".split()
    lines = [" ".join(rng.choice(words) for _ in range(12)) for _ in range(300)]
    (tmp / "corpus.txt").write_text("\n".join(lines), encoding="utf-8")
    sentencepiece.SentencePieceTrainer.train(
        input=str(tmp / "corpus.txt"),
        model_prefix=str(tmp / "tiny"),
        vocab_size=300,
        model_type="bpe",
        byte_fallback=True,
        pad_id=0,
        bos_id=1,
        eos_id=2,
        unk_id=3,
        pad_piece="[PAD]",
        bos_piece="[BOS]",
        eos_piece="[EOS]",
        unk_piece="[UNK]",
        minloglevel=2,
    )
    return Tokenizer.load(tmp / "tiny.model")


def _stream(tok: Tokenizer, ids: list[int]) -> list[str]:
    """Every chunk a fresh StreamDecoder returns for `ids`, the final flush last."""
    dec = tok.stream_decoder()
    return [dec.feed(i) for i in ids] + [dec.flush()]


# ----------------------------------------------------------------------------- without a model


def test_load_missing_file_names_path_and_fix(tmp_path):
    missing = tmp_path / "nope" / "tokenizer.model"
    with pytest.raises(FileNotFoundError, match="tokenizer.model") as err:
        Tokenizer.load(missing)
    assert str(missing) in str(err.value)
    assert "grok-1" in str(err.value)


def test_load_a_file_that_is_not_a_sentencepiece_model(tmp_path):
    for name, data in (
        ("empty.model", b""),
        ("text.model", b"hello\n"),
        ("bin.model", bytes(range(256))),
    ):
        (tmp_path / name).write_bytes(data)
        with pytest.raises(ValueError, match=f"{name} is not a SentencePiece model file"):
            Tokenizer.load(tmp_path / name)


def test_load_directory_finds_tokenizer_model(tiny_tok, tmp_path):
    (tmp_path / "tokenizer.model").write_bytes(tiny_tok._sp.serialized_model_proto())
    assert Tokenizer.load(tmp_path).vocab_size == 300


def test_special_ids_and_check_vocab(tiny_tok):
    assert (tiny_tok.pad_id, tiny_tok.bos_id, tiny_tok.eos_id) == (0, 1, 2)
    tiny_tok.check_vocab(300)
    with pytest.raises(ValueError, match=r"does not match the model.*300.*131072"):
        tiny_tok.check_vocab(131072)


def test_encode_has_no_bos_and_rejects_bytes(tiny_tok):
    ids = tiny_tok.encode("the cat")
    assert ids and ids[0] != tiny_tok.bos_id
    assert tiny_tok.decode(ids) == "the cat"
    with pytest.raises(TypeError):
        tiny_tok.encode(b"the cat")


def test_encode_with_special_maps_control_pieces_to_their_ids(tiny_tok):
    assert tiny_tok.special_pieces == {"[PAD]": 0, "[BOS]": 1, "[EOS]": 2}
    # plain encode spells the control pieces out; encode_with_special gives their ids
    assert 2 not in tiny_tok.encode("[EOS]")
    assert tiny_tok.encode_with_special("[EOS]") == [2]
    assert tiny_tok.encode_with_special("[BOS][EOS][PAD]") == [1, 2, 0]
    ids = tiny_tok.encode_with_special("the cat[EOS]sat on[BOS] a mat")
    expected = [*tiny_tok.encode("the cat"), 2, *tiny_tok.encode("sat on"), 1]
    assert ids == expected + tiny_tok.encode(" a mat")
    # text without control pieces encodes as `encode` does; [UNK] is not a control piece
    assert tiny_tok.encode_with_special("the cat [UNK]") == tiny_tok.encode("the cat [UNK]")
    assert tiny_tok.encode_with_special("") == []
    with pytest.raises(TypeError):
        tiny_tok.encode_with_special([1, 2])


def test_decode_out_of_range_id(tiny_tok):
    with pytest.raises(ValueError, match="300"):
        tiny_tok.decode([5, 300])
    dec = tiny_tok.stream_decoder()
    with pytest.raises(ValueError, match="out of range"):
        dec.feed(-1)
    assert dec.ids == []


def test_tiny_stream_multibyte_chars(tiny_tok):
    text = "the cat é 猫 🐱 sat, ünïcödé 👨‍👩‍👧!"
    ids = tiny_tok.encode(text)
    assert any(tiny_tok.id_to_piece(i).startswith("<0x") for i in ids), "no byte fallback"
    chunks = _stream(tiny_tok, ids)
    assert "".join(chunks) == tiny_tok.decode(ids) == text
    assert not any("\ufffd" in c for c in chunks)


def test_tiny_stream_holds_partial_char_until_complete(tiny_tok):
    cat_bytes = [tiny_tok._sp.piece_to_id(f"<0x{b:02X}>") for b in "🐱".encode()]
    dec = tiny_tok.stream_decoder()
    assert [dec.feed(i) for i in cat_bytes] == ["", "", "", "🐱"]
    assert dec.feed(tiny_tok.encode("the")[0]) == " the"
    assert dec.flush() == ""


def test_tiny_stream_invalid_bytes_become_replacement_only_at_end(tiny_tok):
    lead = tiny_tok._sp.piece_to_id("<0xE7>")
    dec = tiny_tok.stream_decoder()
    assert dec.feed(tiny_tok.encode("the")[0]) == "the"
    assert dec.feed(lead) == ""
    assert dec.flush() == "\ufffd"
    # An incomplete sequence followed by a normal piece is known to be invalid at once.
    ids = tiny_tok.encode("the") + [lead] + tiny_tok.encode("cat")
    chunks = _stream(tiny_tok, ids)
    assert "".join(chunks) == tiny_tok.decode(ids)
    assert chunks[-1] == ""


def test_tiny_stream_leading_space_and_control_tokens(tiny_tok):
    the = tiny_tok.encode("the")
    for ids in (
        [2, *the, *the],  # the first non-control piece loses its "▁", only that one
        [0, 0, *the, 2, *the, 1, *the],
        [tiny_tok._sp.piece_to_id("▁"), *the, 0, *the],
    ):
        assert "".join(_stream(tiny_tok, ids)) == tiny_tok.decode(ids), ids


def test_tiny_stream_random_ids_match_full_decode(tiny_tok):
    rng = random.Random(1)
    for _ in range(300):
        ids = [rng.randrange(tiny_tok.vocab_size) for _ in range(rng.randrange(1, 25))]
        assert "".join(_stream(tiny_tok, ids)) == tiny_tok.decode(ids), ids


def test_stream_decodes_a_short_window(tiny_tok):
    """Each step re-decodes a few ids, not the whole history."""
    widths = []

    class Recording(Tokenizer):
        def decode(self, ids):
            ids = list(ids)
            widths.append(len(ids))
            return super().decode(ids)

    ids = tiny_tok.encode("the cat sat on the mat 🐱 " * 40)
    chunks = _stream(Recording(tiny_tok._sp), ids)
    assert "".join(chunks) == tiny_tok.decode(ids)
    assert max(widths) <= 8


def test_stream_decoder_class_is_usable_directly(tiny_tok):
    dec = StreamDecoder(tiny_tok)
    ids = tiny_tok.encode("the dog")
    assert "".join(dec.feed(i) for i in ids) + dec.flush() == "the dog"
    assert dec.ids == ids


# ----------------------------------------------------------------------------- the release model


def test_real_special_ids(real_tok):
    assert real_tok.vocab_size == 131072
    assert (real_tok.pad_id, real_tok.bos_id, real_tok.eos_id) == (0, 1, 2)
    real_tok.check_vocab(131072)


def test_real_spec_example(real_tok):
    assert real_tok.encode(SPEC_PROMPT) == SPEC_IDS
    assert real_tok.decode(SPEC_IDS) == SPEC_PROMPT


def test_real_golden_cases(real_tok):
    cases_path = _real_path().parent / "cases.json"
    if not cases_path.is_file():
        pytest.skip(f"golden tokenizer cases not found at {cases_path}")
    cases = json.loads(cases_path.read_text(encoding="utf-8"))["cases"]
    assert len(cases) > 10
    for case in cases:
        ids = real_tok.encode(case["text"])
        assert ids == case["ids"], case["name"]
        assert [real_tok.id_to_piece(i) for i in ids] == case["pieces"], case["name"]
        assert real_tok.decode(case["ids"]) == case["decoded"], case["name"]
        assert "".join(_stream(real_tok, case["ids"])) == case["decoded"], case["name"]


@pytest.mark.parametrize("text", STREAM_TEXTS)
def test_real_stream_equals_full_decode(real_tok, text):
    ids = real_tok.encode(text)
    chunks = _stream(real_tok, ids)
    assert "".join(chunks) == real_tok.decode(ids) == text
    assert not any("\ufffd" in c for c in chunks)


def test_real_stream_random_ids_match_full_decode(real_tok):
    rng = random.Random(2)
    byte_ids = range(69, 325)  # <0x00>..<0xFF>
    for _ in range(200):
        ids = []
        for _ in range(rng.randrange(1, 30)):
            r = rng.random()
            if r < 0.4:
                ids.append(rng.choice(byte_ids))
            elif r < 0.5:
                ids.append(rng.randrange(4))  # [PAD] [BOS] [EOS] [UNK]
            else:
                ids.append(rng.randrange(real_tok.vocab_size))
        assert "".join(_stream(real_tok, ids)) == real_tok.decode(ids), ids
