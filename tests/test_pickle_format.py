"""Tests of one release tensor file (`pickle_reader`, `pickle_writer`): safe reading, sliced
reading, exact writing, and one-line errors naming the file."""

from __future__ import annotations

import copyreg
import glob
import io
import json
import os
import pickle
import pickletools
import re
import subprocess
import sys
import textwrap

import ml_dtypes
import numpy as np
import pytest

from grok1.checkpoint import pickle_reader as pr
from grok1.checkpoint import pickle_writer as pw
from grok1.checkpoint.pickle_reader import open_tensor, read_tensor
from grok1.checkpoint.pickle_writer import write_tensor
from grok1.checkpoint.tensors import BF16, CheckpointError, MemoryTensor, QuantizedWeight8bit
from tests.conftest import random_index

GOLDEN = os.path.join(os.path.dirname(__file__), "data", "golden")
CASES = sorted(glob.glob(os.path.join(GOLDEN, "*", "")))
RELEASE_GLOBALS = {
    "__main__ QuantizedWeight8bit", "numpy.core.multiarray _reconstruct", "numpy ndarray",
    "numpy dtype", "ml_dtypes bfloat16",
}  # fmt: skip


def golden_files():
    """(file, param_index entry) for every golden tensor file."""
    out = []
    for case in CASES:
        with open(os.path.join(case, "param_index.json")) as f:
            for entry in json.load(f)["tensors"]:
                out.append((os.path.join(case, "ckpt-0", entry["file"]), entry))
    return out


def same(a: np.ndarray, b: np.ndarray) -> bool:
    """Bitwise equality with equal shapes and dtypes."""
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


def rng_quantized(rng, shape, groups):
    weight = rng.integers(-128, 128, shape).astype(np.int8)
    scales_shape = shape[:-2] + (groups, shape[-1])
    return QuantizedWeight8bit(weight, rng.standard_normal(scales_shape).astype(ml_dtypes.bfloat16))


# ---------------------------------------------------------------------------------------------
# Hand-made pickle opcodes, independent of the module under test.
# ---------------------------------------------------------------------------------------------
def s(text: str) -> bytes:  # SHORT_BINUNICODE
    data = text.encode()
    return b"\x8c" + bytes([len(data)]) + data


def sg(module: str, name: str) -> bytes:  # STACK_GLOBAL
    return s(module) + s(name) + b"\x93"


def g(module: str, name: str) -> bytes:  # GLOBAL (text form)
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


def i(value: int) -> bytes:  # LONG1
    return b"\x8a\x08" + value.to_bytes(8, "little", signed=True)


def binbytes(data: bytes) -> bytes:
    return b"B" + len(data).to_bytes(4, "little") + data


def pk(*ops: bytes) -> bytes:
    return b"\x80\x04" + b"".join(ops) + b"."


DTYPE_STATE = b"(" + i(3) + s("<") + b"NNN" + i(-1) + i(-1) + i(0) + b"t"


def dtype_ops(arg: bytes, state: bytes = DTYPE_STATE) -> bytes:
    return sg("numpy", "dtype") + arg + b"\x89\x88\x87R" + state + b"b"


def array_ops(shape, raw: bytes, dtype: bytes = None, cls: bytes = None) -> bytes:
    dtype = dtype_ops(s("f4")) if dtype is None else dtype
    cls = sg("numpy", "ndarray") if cls is None else cls
    head = sg("numpy.core.multiarray", "_reconstruct") + cls + i(0) + b"\x85C\x01b\x87R"
    shape_ops = b"(" + b"".join(i(n) for n in shape) + b"t"
    return head + b"(" + i(1) + shape_ops + dtype + b"\x89" + binbytes(raw) + b"tb"


def quantized_ops(entries: dict) -> bytes:
    items = b"".join(s(k) + v for k, v in entries.items())
    return sg("__main__", "QuantizedWeight8bit") + b")\x81}(" + items + b"ub"


def test_hand_made_pickles_are_valid():
    """The helpers build files our reader accepts, so the refusals below are meaningful."""
    raw = np.arange(6, dtype="<f4").tobytes()
    assert same(nf_read_bytes(pk(array_ops((2, 3), raw))), np.arange(6, dtype="<f4").reshape(2, 3))
    bf = dtype_ops(sg("ml_dtypes", "bfloat16"))
    i1 = dtype_ops(s("i1"), DTYPE_STATE.replace(b"<", b"|"))
    weight, scales = array_ops((4, 2), bytes(range(8)), i1), array_ops((2, 2), bytes(8), bf)
    qw = quantized_ops({"weight": weight, "scales": scales})
    value = nf_read_bytes(pk(qw))
    assert isinstance(value, QuantizedWeight8bit) and value.num_groups == 2


def nf_read_bytes(data: bytes, tmp_dir=None):
    import tempfile

    with tempfile.TemporaryDirectory(dir=tmp_dir) as d:
        path = os.path.join(d, "tensor00000_000")
        with open(path, "wb") as f:
            f.write(data)
        return read_tensor(path)


# ---------------------------------------------------------------------------------------------
# The malicious corpus.
# ---------------------------------------------------------------------------------------------
def malicious_corpus(canary: str) -> dict[str, tuple[bytes, str]]:
    """name -> (file bytes, text the refusal must mention). Each payload, if run, would create
    `canary` or set the GROK1_PWNED environment variable."""
    sh = f"touch {canary}"
    golden_qw = open(os.path.join(CASES[0], "ckpt-0", "tensor00005_000"), "rb").read()
    golden_f32 = open(os.path.join(CASES[0], "ckpt-0", "tensor00001_000"), "rb").read()
    raw4 = np.ones(1, "<f4").tobytes()
    be_state = b"(" + i(3) + s(">") + b"NNN" + i(-1) + i(-1) + i(0) + b"t"
    f32 = array_ops((1, 1), raw4)
    unbuilt = (
        sg("numpy.core.multiarray", "_reconstruct")
        + sg("numpy", "ndarray")
        + b"K\x00\x85C\x01b\x87R"
    )
    state = b"(" + i(1) + b"(" + i(1) + b"t" + dtype_ops(s("f4")) + b"\x89" + binbytes(raw4) + b"t"

    class Evil:
        def __reduce__(self):
            return os.system, (sh,)

    return {
        "os.system via GLOBAL": (pk(g("os", "system"), s(sh), b"\x85R"), "os.system"),
        "posix.system via STACK_GLOBAL": (
            pk(sg("posix", "system"), s(sh), b"\x85R"),
            "posix.system",
        ),
        "pickle.dumps of an os.system reducer": (pickle.dumps(Evil(), protocol=4), ".system"),
        "subprocess.Popen": (
            pk(sg("subprocess", "Popen"), s("touch"), s(canary), b"\x86\x85R"),
            "subprocess.Popen",
        ),
        "builtins.eval": (
            pk(sg("builtins", "eval"), s(f"open({canary!r}, 'w')"), b"\x85R"),
            "builtins.eval",
        ),
        "builtins.exec": (
            pk(sg("builtins", "exec"), s("import os; os.environ['GROK1_PWNED'] = '1'"), b"\x85R"),
            "builtins.exec",
        ),
        "builtins.getattr": (
            pk(sg("builtins", "getattr"), sg("numpy", "ndarray"), s("tofile"), b"\x86R"),
            "builtins.getattr",
        ),
        "nested pickle.loads": (
            pk(sg("pickle", "loads"), binbytes(pk(g("os", "system"), s(sh), b"\x85R")), b"\x85R"),
            "pickle.loads",
        ),
        "_pickle.loads": (pk(g("_pickle", "loads"), binbytes(b"x"), b"\x85R"), "_pickle.loads"),
        "another __main__ class": (pk(sg("__main__", "Evil"), b")\x81"), "__main__.Evil"),
        "QuantizedWeight8bit from another module": (
            pk(sg("grok1.checkpoint.tensors", "QuantizedWeight8bit"), b")\x81"),
            "grok1.checkpoint.tensors.QuantizedWeight8bit",
        ),
        "QuantizedWeight8bit subclass name": (
            pk(sg("__main__", "QuantizedWeight8bitSub"), b")\x81"),
            "QuantizedWeight8bitSub",
        ),
        "numpy scalar global": (pk(sg("numpy.core.multiarray", "scalar")), "scalar"),
        "_reconstruct with numpy.dtype as class": (
            pk(array_ops((1,), raw4, cls=sg("numpy", "dtype"))),
            "only numpy.ndarray",
        ),
        "_reconstruct with bfloat16 as class": (
            pk(array_ops((1,), raw4, cls=sg("ml_dtypes", "bfloat16"))),
            "only numpy.ndarray",
        ),
        "object dtype": (pk(array_ops((1,), raw4, dtype_ops(s("O")))), "'O'"),
        "object dtype patched into a golden file": (
            golden_f32.replace(b"\x8c\x02f4", b"\x8c\x02O8"),
            "'O8'",
        ),
        "big-endian dtype": (pk(array_ops((1,), raw4, dtype_ops(s("f4"), be_state))), "'>'"),
        "truncated stream": (golden_qw[: len(golden_qw) // 2], "truncated"),
        "no STOP": (golden_f32[:-1], "truncated"),
        "trailing bytes": (golden_f32 + b"K\x01.", "after STOP"),
        "huge declared shape, tiny data": (pk(array_ops((10**12,), raw4)), "holds 4 bytes"),
        "payload longer than the file": (
            pk(b"\x8e" + (2**40).to_bytes(8, "little") + b"abc"),
            "needs at least 1099511627",
        ),
        "persistent id (BINPERSID)": (pk(s("x"), b"Q"), "BINPERSID"),
        "persistent id (PERSID)": (pk(b"Px\n"), "PERSID"),
        "extension code (EXT1)": (pk(b"\x82\xf0", s(sh), b"\x85R"), "EXT1"),
        "top-level int": (pk(b"K\x05"), "top-level object is int"),
        "top-level dict": (pk(b"}"), "top-level object is dict"),
        "top-level unbuilt array": (pk(unbuilt), "top-level object"),
        "BUILD on numpy.ndarray": (pk(sg("numpy", "ndarray"), b"}", s("a"), b"K\x01sb"), "BUILD"),
        "BUILD slotstate on numpy.dtype": (
            pk(sg("numpy", "dtype"), b"N}", s("__defaults__"), b"K\x01s\x86b"),
            "BUILD",
        ),
        "BUILD twice on one array": (pk(array_ops((1,), raw4), state, b"b"), "BUILD"),
        "REDUCE on numpy.ndarray": (pk(sg("numpy", "ndarray"), i(3), b"\x85R"), "not callable"),
        "dtype with align=True": (
            pk(array_ops((1,), raw4, sg("numpy", "dtype") + s("f4") + b"\x88\x88\x87R")),
            "align=True",
        ),
        "QuantizedWeight8bit with an extra key": (
            pk(quantized_ops({"weight": f32, "scales": f32, "evil": b"K\x01"})),
            "keys",
        ),
        "QuantizedWeight8bit with f32 weight": (
            pk(quantized_ops({"weight": f32, "scales": f32})),
            "int8 weight",
        ),
        "QuantizedWeight8bit constructor args": (
            pk(sg("__main__", "QuantizedWeight8bit"), s("x"), b"\x85\x81"),
            "no constructor",
        ),
    }


@pytest.fixture
def canary(tmp_path, monkeypatch):
    monkeypatch.delenv("GROK1_PWNED", raising=False)
    path = tmp_path / "pwned"
    yield str(path)
    assert not path.exists(), "a payload ran"
    assert "GROK1_PWNED" not in os.environ, "a payload ran"


def test_canary_fires_under_plain_pickle(canary):
    """Sanity check of the canary: plain pickle runs the payload; our reader does not."""
    data, _ = malicious_corpus(canary)["builtins.eval"]
    pickle.loads(data).close()
    assert os.path.exists(canary)
    os.remove(canary)


def test_malicious_corpus_is_refused(tmp_path, canary, monkeypatch):
    corpus = malicious_corpus(canary)
    assert len(corpus) >= 10
    copyreg.add_extension("os", "system", 0xF0)  # make EXT1 0xF0 a real threat under pickle
    try:
        for name, (data, mention) in corpus.items():
            path = tmp_path / ("bad_" + "".join(c if c.isalnum() else "_" for c in name))
            path.write_bytes(data)
            for reader in (read_tensor, open_tensor):
                with pytest.raises(CheckpointError) as info:
                    reader(path)
                assert str(path) in str(info.value), name
                assert mention in str(info.value), (name, str(info.value))
    finally:
        copyreg.remove_extension("os", "system", 0xF0)


def test_refused_globals_never_reach_the_unpickler(tmp_path, canary, monkeypatch):
    """Globals are refused by the inert opcode walk, before any unpickling starts."""

    def boom(self):
        raise AssertionError("the unpickler ran")

    monkeypatch.setattr(pr._RestrictedUnpickler, "load", boom)
    for data, mention in malicious_corpus(canary).values():
        if re.fullmatch(r"[\w.]+\.\w+", mention):  # the cases that name a global
            path = tmp_path / "bad"
            path.write_bytes(data)
            with pytest.raises(CheckpointError, match="refused global"):
                read_tensor(path)


def test_restricted_unpickler_alone_refuses_globals(canary):
    """Second line of defence: the unpickler's find_class refuses too."""
    for name in ("os.system via GLOBAL", "builtins.eval", "nested pickle.loads"):
        data, _ = malicious_corpus(canary)[name]
        with pytest.raises(pr._Refused, match="refused global"):
            pr._RestrictedUnpickler(io.BytesIO(data)).load()


# ---------------------------------------------------------------------------------------------
# Golden files.
# ---------------------------------------------------------------------------------------------
def test_golden_files_read_with_param_index_shapes():
    files = golden_files()
    assert len(files) == sum(len(os.listdir(os.path.join(c, "ckpt-0"))) for c in CASES)
    for path, entry in files:
        value = read_tensor(path)
        if entry["stored"] == "numpy.ndarray":
            assert isinstance(value, np.ndarray) and value.flags.c_contiguous
            assert (list(value.shape), str(value.dtype)) == (entry["shape"], entry["dtype"])
        else:
            assert isinstance(value, QuantizedWeight8bit)
            assert list(value.weight.shape) == entry["weight_shape"]
            assert list(value.scales.shape) == entry["scales_shape"]
            assert value.weight.dtype == np.int8 and value.scales.dtype == BF16
            assert value.num_groups == entry["scale_groups"]


def test_golden_files_rewrite_byte_identical(tmp_path):
    for path, _ in golden_files():
        out = tmp_path / "t"
        write_tensor(out, read_tensor(path))
        assert out.read_bytes() == open(path, "rb").read(), path


def globals_of(data: bytes) -> set:
    """The "module name" globals a pickle names, traced with pickletools (memo included)."""
    found, pushed, memo = set(), [], []
    for op, arg, _ in pickletools.genops(data):
        if op.name in ("SHORT_BINUNICODE", "BINUNICODE"):
            pushed.append(arg)
        elif op.name == "BINGET":
            pushed.append(memo[arg])
        elif op.name == "MEMOIZE":
            memo.append(pushed[-1] if pushed else None)
        elif op.name == "STACK_GLOBAL":
            found.add(f"{pushed[-2]} {pushed[-1]}")
            pushed.append(None)
        else:
            pushed.append(None)
    return found


def test_written_files_name_exactly_the_release_globals(tmp_path):
    rng = np.random.default_rng(0)
    write_tensor(tmp_path / "q", rng_quantized(rng, (64, 32), 8))
    write_tensor(tmp_path / "a", rng.standard_normal((3, 5)).astype(np.float32))
    names = globals_of((tmp_path / "q").read_bytes()) | globals_of((tmp_path / "a").read_bytes())
    assert names == RELEASE_GLOBALS
    golden = os.path.join(CASES[0], "ckpt-0")
    release = {g for n in ("tensor00000_000", "tensor00005_000")
               for g in globals_of(open(os.path.join(golden, n), "rb").read())}  # fmt: skip
    assert release == RELEASE_GLOBALS


def test_open_tensor_offsets_match_full_read():
    for path, _ in golden_files():
        full, tf = read_tensor(path), open_tensor(path)
        data = open(path, "rb").read()
        parts = {"array": full} if tf.kind == "array" else vars(full)
        assert set(parts) == set(tf.parts)
        for part, array in parts.items():
            layout = tf.layout(part)
            assert layout.shape == array.shape and layout.dtype == array.dtype
            assert data[layout.offset : layout.offset + layout.nbytes] == array.tobytes()
            assert same(tf.read_part(part), array)


def test_sliced_reads_equal_numpy_indexing():
    rng = np.random.default_rng(1)
    for path, _ in golden_files()[:26]:
        full, tf = read_tensor(path), open_tensor(path)
        parts = {"array": full} if tf.kind == "array" else vars(full)
        for part, array in parts.items():
            for _ in range(6):
                index = random_index(rng, array.shape)
                got = tf.read_part(part, index)
                assert same(got, np.ascontiguousarray(array[index])), (path, part, index)
                assert got.flags.c_contiguous and got.flags.writeable


def test_open_tensor_falls_back_for_fortran_layout(tmp_path):
    raw = np.arange(6, dtype="<f4").tobytes()
    data = pk(array_ops((2, 3), raw)).replace(b"\x89B", b"\x88B")  # is_fortran = True
    path = tmp_path / "f"
    path.write_bytes(data)
    want = np.arange(6, dtype="<f4").reshape(2, 3, order="F")
    assert same(read_tensor(path), np.ascontiguousarray(want))
    tf = open_tensor(path)
    assert isinstance(tf, MemoryTensor) and same(tf.read((1, slice(0, 2))), want[1, :2].copy())


class CountingFile(io.FileIO):
    bytes_read = 0

    def readinto(self, buffer):
        n = super().readinto(buffer)
        CountingFile.bytes_read += n or 0
        return n

    def read(self, size=-1):
        data = super().read(size)
        CountingFile.bytes_read += len(data)
        return data


def test_slice_of_a_large_file_reads_only_its_rows(tmp_path, monkeypatch):
    rows, cols = 8192, 2048  # 64 MiB of float32
    value = np.arange(rows * cols, dtype=np.float32).reshape(rows, cols)
    path = tmp_path / "big"
    write_tensor(path, value)
    monkeypatch.setattr(pr, "_open_raw", lambda p: CountingFile(p, "r"))
    CountingFile.bytes_read = 0
    tf = open_tensor(path)
    part = tf.read(slice(1024, 2048))
    assert same(part, value[1024:2048])
    slice_bytes = 1024 * cols * 4
    assert slice_bytes <= CountingFile.bytes_read <= slice_bytes + 64 * 1024
    # Corrupt every other row on disk: the slice is unchanged, a full read sees the damage.
    offset = tf.layout("array").offset
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(b"\xff" * slice_bytes)
        f.seek(offset + 2048 * cols * 4)
        f.write(b"\xff" * (rows - 2048) * cols * 4)
    assert same(open_tensor(path).read(slice(1024, 2048)), value[1024:2048])
    assert np.isnan(read_tensor(path)[:1024]).all()


def test_column_slices_read_row_pieces(tmp_path, monkeypatch):
    value = np.arange(64 * 1024 * 8, dtype=np.float32).reshape(8, 64, 1024)
    path = tmp_path / "moe"
    write_tensor(path, value)
    monkeypatch.setattr(pr, "_open_raw", lambda p: CountingFile(p, "r"))
    tf = open_tensor(path)
    CountingFile.bytes_read = 0
    got = tf.read((slice(None), slice(0, 32), slice(512, 1024)))
    assert same(got, np.ascontiguousarray(value[:, :32, 512:]))
    assert CountingFile.bytes_read <= 8 * 32 * 1024 * 4  # the needed rows, not the whole file


def test_output_column_shards_of_an_expert_tensor_read_exact_rows(tmp_path, monkeypatch):
    """An [E, D, F] weight split 8 ways on F: per-row reads of 4 KiB, not the whole tensor."""
    rng = np.random.default_rng(4)
    value = rng_quantized(rng, (4, 256, 32768), 1)  # 32 MiB of int8
    path = tmp_path / "moe"
    write_tensor(path, value)
    monkeypatch.setattr(pr, "_open_raw", lambda p: CountingFile(p, "r"))
    tf = open_tensor(path)
    CountingFile.bytes_read = 0
    index = (slice(None), slice(None), slice(4096, 8192))
    assert same(tf.read_weight(index), np.ascontiguousarray(value.weight[index]))
    assert CountingFile.bytes_read == 4 * 256 * 4096
    assert same(tf.read_scales(index), np.ascontiguousarray(value.scales[index]))


def test_reading_a_rewritten_file_is_refused(tmp_path):
    path = tmp_path / "t"
    write_tensor(path, np.zeros(4, np.float32))
    tf = open_tensor(path)
    write_tensor(path, np.ones(8, np.float32))
    with pytest.raises(CheckpointError, match="changed since open_tensor"):
        tf.read()


# ---------------------------------------------------------------------------------------------
# One-line errors naming the file.
# ---------------------------------------------------------------------------------------------
def refusal(path) -> str:
    """The message both readers give for `path` (they must agree), checked to be one line."""
    messages = []
    for reader in (read_tensor, open_tensor):
        with pytest.raises(CheckpointError) as info:
            reader(path)
        messages.append(str(info.value))
    assert messages[0] == messages[1] and "\n" not in messages[0]
    return messages[0]


NOT_A_TENSOR_FILE = (
    "is not a valid Grok-1 release tensor file (a protocol-4 pickle of a NumPy array or "
    "QuantizedWeight8bit): "
)


def test_non_pickle_files_say_what_a_tensor_file_is(tmp_path):
    random = b"\xa0" + np.random.default_rng(0).bytes(4095)
    npy = io.BytesIO()
    np.save(npy, np.zeros(3, np.float32))
    cases = {
        "random": (random, "does not start with a pickle header (first bytes b'\\xa0"),
        "text": (b"version https://git-lfs.github.com/spec/v1\n", "first bytes b'version "),
        "npy": (npy.getvalue(), "first bytes b'\\x93NUMPY"),
        "empty": (b"", "the file is empty"),
        "protocol-2 list": (pickle.dumps([1.0], protocol=2), "EMPTY_LIST"),
    }
    for name, (data, reason) in cases.items():
        path = tmp_path / "ckpt-0" / name
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(data)
        message = refusal(path)
        assert message.startswith(f"{path} {NOT_A_TENSOR_FILE}"), message
        assert reason in message, (name, message)
        assert f"Re-download it, or check that {path.parent} holds the release's" in message


def test_truncated_file_says_its_size_and_the_size_it_needs(tmp_path):
    big = tmp_path / "big"  # payloads over 64 KiB are written outside pickle frames
    write_tensor(big, rng_quantized(np.random.default_rng(7), (256, 512), 8))
    golden = os.path.join(CASES[0], "ckpt-0", "tensor00005_000")  # small: one frame
    weight, frame = open_tensor(big).layout("weight"), os.path.getsize(golden) - 11
    cuts = {
        (golden, os.path.getsize(golden) // 2): f"(a {frame}-byte frame at byte 11)",
        (big, weight.offset + 10): (
            f"needs at least {weight.offset + weight.nbytes} (a {weight.nbytes}-byte payload "
            f"at byte {weight.offset})"
        ),
        (big, os.path.getsize(big) - 1): f"needs at least {os.path.getsize(big)} (a ",
    }
    for (source, keep), detail in cuts.items():
        path = tmp_path / f"cut{keep}"
        path.write_bytes(open(source, "rb").read()[:keep])
        message = refusal(path)
        assert message.startswith(f"{path} is truncated: it holds {keep} bytes but needs at least ")
        assert detail in message and message.endswith("Re-download it"), message


# ---------------------------------------------------------------------------------------------
# The writer.
# ---------------------------------------------------------------------------------------------
def test_writer_matches_cpython_pickler_framing(monkeypatch):
    """With numpy-2 spellings our bytes equal `pickle.dumps` of the same objects, across frame
    boundaries (payloads around 64 KiB, several arrays in one frame)."""
    rng = np.random.default_rng(2)
    spelling = ("numpy._core.multiarray", "_reconstruct")
    for shape in [(), (0,), (3,), (16383,), (16384,), (2, 3, 4, 5), (3, 21845)]:
        value = rng.standard_normal(shape).astype(np.float32)
        mine = b"".join(bytes(c) for c in pw.tensor_pickle_chunks(value, reconstruct=spelling))
        assert mine == pickle.dumps(value, protocol=4), shape

    class Release:  # the release's class, as seen by pickle
        pass

    Release.__module__, Release.__qualname__ = "__main__", "QuantizedWeight8bit"
    monkeypatch.setattr(sys.modules["__main__"], "QuantizedWeight8bit", Release, raising=False)
    flags = np.dtype(ml_dtypes.bfloat16).__reduce__()[2][-1]  # this numpy's bf16 flags
    monkeypatch.setitem(pw._DTYPE_PICKLE, BF16, (("ml_dtypes", "bfloat16"), "<", 2, 2, flags))
    for shape, groups in [((128, 32), 1), ((8, 8192), 1), ((65535, 1), 1), ((64, 1024), 8)]:
        q = rng_quantized(rng, shape, groups)
        release = Release()
        release.weight, release.scales = q.weight, q.scales
        mine = b"".join(bytes(c) for c in pw.tensor_pickle_chunks(q, reconstruct=spelling))
        assert mine == pickle.dumps(release, protocol=4), shape


def test_writer_round_trip_is_exact(tmp_path):
    rng = np.random.default_rng(3)
    values = [
        np.array([np.nan, -0.0, np.inf, 1e-45], np.float32),
        rng.standard_normal((7, 5, 3, 2)).astype(np.float32),
        rng.standard_normal((5, 3)).astype(np.float32).T,  # not C-contiguous
        rng_quantized(rng, (3, 16, 8), 4),
    ]
    for n, value in enumerate(values):
        path = tmp_path / f"t{n}"
        write_tensor(path, value)
        got = read_tensor(path)
        if isinstance(value, QuantizedWeight8bit):
            assert same(got.weight, value.weight) and same(got.scales, value.scales)
        else:
            assert same(got, np.ascontiguousarray(value))


def test_writer_refuses_other_types(tmp_path):
    for value in (np.zeros(3), np.zeros(3, np.int8), [1.0], "x"):
        with pytest.raises(CheckpointError, match="float32 ndarray or a QuantizedWeight8bit"):
            write_tensor(tmp_path / "t", value)
    assert os.listdir(tmp_path) == []


def test_writer_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "t"
    write_tensor(path, np.ones(4, np.float32))
    before = path.read_bytes()

    def failing_fsync(fd):
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", failing_fsync)
    with pytest.raises(OSError, match="disk full"):
        write_tensor(path, np.zeros(1 << 16, np.float32))
    assert path.read_bytes() == before and os.listdir(tmp_path) == ["t"]


def test_quantized_weight_validation():
    w, s = np.zeros((8, 4), np.int8), np.zeros((2, 4), ml_dtypes.bfloat16)
    assert QuantizedWeight8bit(w, s).num_groups == 2
    bad = [
        (w, np.zeros((3, 4), ml_dtypes.bfloat16)),  # 3 groups do not divide 8
        (w, np.zeros((2, 5), ml_dtypes.bfloat16)),  # output dim differs
        (w.astype(np.float32), s),
        (w, s.astype(np.float32)),
        (w[0], s[0]),  # rank 1
    ]
    for weight, scales in bad:
        with pytest.raises(CheckpointError):
            QuantizedWeight8bit(weight, scales)


# ---------------------------------------------------------------------------------------------
# The numpy-2 / ml_dtypes bfloat16 corruption (SPEC.md §5).
# ---------------------------------------------------------------------------------------------
PROBE = """
import jax, jax.numpy as jnp, numpy as np, ml_dtypes, glob, pickle, sys
flags_before = np.dtype(ml_dtypes.bfloat16).flags
files = sorted(glob.glob(sys.argv[2] + "/*/ckpt-0/*"))
if sys.argv[1] == "ours":
    from grok1.checkpoint.pickle_reader import read_tensor, open_tensor
    for f in files:
        read_tensor(f)
        open_tensor(f).read()
else:
    class QuantizedWeight8bit:
        pass
    for f in files:
        with open(f, "rb") as fh:
            pickle.load(fh)
jax_ok = True
try:
    jnp.asarray(np.zeros(3, ml_dtypes.bfloat16))
    jax.jit(lambda x: x * 2)(jnp.ones(3, jnp.bfloat16)).block_until_ready()
except Exception:
    jax_ok = False
print(flags_before, np.dtype(ml_dtypes.bfloat16).flags, jax_ok)
"""


def run_probe(mode: str) -> list[str]:
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(PROBE), mode, GOLDEN],
        capture_output=True, text=True, env=env, cwd=root, check=True,
    )  # fmt: skip
    return out.stdout.split()


def test_reading_keeps_bfloat16_usable_by_jax():
    before, after, jax_ok = run_probe("ours")
    assert before == after and jax_ok == "True"


def test_plain_pickle_does_corrupt_bfloat16():
    """Shows the probe can fail: with the pinned numpy 2.4.6 + ml_dtypes 0.6.0, plain pickle on
    a golden file rewrites bf16's flags (64 -> 80) and JAX then rejects bf16 arrays."""
    before, after, jax_ok = run_probe("plain")
    assert before != after and jax_ok == "False"
