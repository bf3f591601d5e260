"""The fast MoE paths against a loop-over-experts oracle written here in NumPy (SPEC.md §2, §4)."""

import haiku as hk
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from grok1 import moe
from grok1.config import ModelConfig
from grok1.layers import MatrixFormat
from grok1.numerics import Numerics

BF16_NP = ml_dtypes.bfloat16


def bf16(x):
    return np.asarray(x, np.float32).astype(BF16_NP).astype(np.float32)


def gelu_tanh(x):
    return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))


def dequant(leaf, rounded=True):
    """W = bf16(bf16(q) * scales) grouped along the input axis (exact q * scales when not
    `rounded`: the float32 mode); plain f32 matrices -> bf16(W) when `rounded`."""
    w = np.asarray(leaf["w"].astype(jnp.float32))
    if "scales" not in leaf:
        return bf16(w) if rounded else w
    s = np.asarray(leaf["scales"].astype(jnp.float32))  # [Gs, Out]
    n_in, n_out = w.shape
    g = s.shape[0]
    w = w.reshape(g, n_in // g, n_out) * s[:, None, :]
    return (bf16(w) if rounded else w).reshape(n_in, n_out)


MATS = ("gate", "up", "down")


def expert_leaf(params, name, e):
    return {key: v[e] for key, v in params[f"moe/{name}"].items()}


def oracle(params, z, k, dtype, rounding="release"):
    """For each token, for each of its top-k experts, the expert FFN; gates are raw softmax.
    Under rounding="fast" every int8 weight is q * s exactly."""
    p = params["moe"]
    rnd = bf16 if dtype == jnp.bfloat16 else (lambda x: np.asarray(x, np.float32))
    zf = np.asarray(z.astype(jnp.float32))  # [N, D]
    logits = zf @ np.asarray(p["router"], np.float32)
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    out = np.zeros_like(zf)
    for n in range(zf.shape[0]):
        order = sorted(range(probs.shape[1]), key=lambda e: (-probs[n, e], e))[:k]
        acc = np.zeros(zf.shape[1], np.float32)
        for e in order:
            rounded = dtype == jnp.bfloat16 and rounding != "fast"
            w = {m: dequant(expert_leaf(params, m, e), rounded) for m in MATS}
            if "scales" not in params["moe/down"]:  # the down projection runs in f32
                w["down"] = np.asarray(expert_leaf(params, "down", e)["w"], np.float32)
            u = rnd(zf[n] @ w["up"])
            g = gelu_tanh(rnd(zf[n] @ w["gate"]))
            o = (u * g) @ w["down"]
            acc += bf16(probs[n, e]) * o
        out[n] = bf16(acc)
    return out


def make(config, groups, strategy, dtype, rounding="release", backend="cpu"):
    fmt = MatrixFormat(groups)
    formats = {"gate": fmt, "up": fmt, "down": fmt}
    numerics = Numerics(jnp.dtype(dtype).name, rounding, backend)

    def fn(z):
        return moe.MoE(config, formats, numerics, strategy=strategy)(z)

    t = hk.without_apply_rng(hk.transform(fn))
    return t


CONFIG = ModelConfig.tiny(emb_size=64, num_experts=8, num_selected_experts=2)


CASES = [  # (activation dtype, scale groups or None for a plain f32 matrix, tokens)
    (jnp.bfloat16, 1, 1), (jnp.bfloat16, 8, 1), (jnp.bfloat16, 8, 12), (jnp.bfloat16, 1, 12),
    (jnp.float32, 1, 1), (jnp.float32, 8, 12), (jnp.float32, 8, 1), (jnp.bfloat16, None, 5),
]  # fmt: skip


@pytest.mark.parametrize("dtype,groups,tokens,rounding", [(*c, "release") for c in CASES] + [
    (jnp.bfloat16, 8, 4, "fast"), (jnp.bfloat16, 1, 12, "fast"), (jnp.bfloat16, None, 5, "fast"),
])  # fmt: skip
def test_strategies_match_loop_oracle(dtype, groups, tokens, rounding):
    key = jax.random.PRNGKey(tokens * 10 + (groups or 0))
    z = jax.random.normal(key, (1, tokens, CONFIG.emb_size)).astype(dtype)
    params = make(CONFIG, groups, "gather", dtype).init(jax.random.PRNGKey(1), z)
    want = oracle(params, z.reshape(tokens, -1), CONFIG.num_selected_experts, dtype, rounding)
    scale = np.abs(want).max()
    for strategy in ("gather", "dense", "grouped"):
        got = jax.jit(make(CONFIG, groups, strategy, dtype, rounding).apply)(params, z)
        assert got.dtype == jnp.bfloat16  # the release casts the MoE output to bf16
        got = np.asarray(got.astype(jnp.float32)).reshape(tokens, -1)
        err = np.abs(got - want)
        # bf16 rounding of the intermediates may differ by one ulp with the summation order
        assert err.max() <= 0.03 * scale, (strategy, err.max(), scale)
        assert err.mean() <= 0.002 * scale, (strategy, err.mean(), scale)


@pytest.mark.parametrize("rounding", ["release", "fast"])
def test_gpu_formulation_matches_loop_oracle(rounding):
    """What a GPU backend runs, computed here: one-row products widened to float32 (reductions
    over the int8 weight there), products of more rows as bf16 dots (under "fast", of the int8
    values, exact in bf16)."""
    gpu = Numerics(backend="gpu")
    assert gpu.dots_in_f32(rows=1) and not gpu.dots_in_f32(rows=2)
    dtype, groups, tokens = jnp.bfloat16, 8, 6
    z = jax.random.normal(jax.random.PRNGKey(tokens), (1, tokens, CONFIG.emb_size)).astype(dtype)
    params = make(CONFIG, groups, "gather", dtype).init(jax.random.PRNGKey(1), z)
    want = oracle(params, z.reshape(tokens, -1), CONFIG.num_selected_experts, dtype, rounding)
    scale = np.abs(want).max()
    for strategy in ("auto", "gather", "grouped"):
        apply = make(CONFIG, groups, strategy, dtype, rounding, backend="gpu").apply
        dots = [e for e in jax.make_jaxpr(apply)(params, z).eqns if "dot" in e.primitive.name]
        operand_types = {str(v.aval.dtype) for e in dots for v in e.invars} - {"int32"}
        limit = moe.ACCELERATOR_GATHER_FACTOR * CONFIG.num_experts  # rows auto gathers on GPU
        gathered = strategy == "gather" or (strategy == "auto" and tokens * 2 <= limit)
        assert operand_types == ({"float32"} if gathered else {"bfloat16", "float32"}), strategy
        got = np.asarray(jax.jit(apply)(params, z).astype(jnp.float32)).reshape(tokens, -1)
        err = np.abs(got - want)
        assert err.max() <= 0.03 * scale, (strategy, err.max(), scale)
        assert err.mean() <= 0.002 * scale, (strategy, err.mean(), scale)


@pytest.mark.parametrize("backend,gathered,beyond", [("cpu", 4, "dense"), ("gpu", 16, "grouped"),
                                                     ("tpu", 16, "grouped")])  # fmt: skip
def test_auto_strategy_per_backend(backend, gathered, beyond):
    assert moe.choose_strategy("auto", gathered, 2, 8, backend) == "gather"
    assert moe.choose_strategy("auto", gathered + 1, 2, 8, backend) == beyond


def test_gather_and_grouped_agree_closely():
    z = jax.random.normal(jax.random.PRNGKey(3), (2, 5, CONFIG.emb_size)).astype(jnp.bfloat16)
    params = make(CONFIG, 8, "gather", jnp.bfloat16).init(jax.random.PRNGKey(4), z)
    a = make(CONFIG, 8, "gather", jnp.bfloat16).apply(params, z).astype(jnp.float32)
    for strategy in ("grouped", "dense"):
        b = make(CONFIG, 8, strategy, jnp.bfloat16).apply(params, z).astype(jnp.float32)
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-2, atol=2e-2)


def test_route_ties_go_to_lower_index_and_gates_are_raw():
    d, e = 4, 6
    w = np.zeros((d, e), np.float32)
    w[0] = [0.0, 1.0, 0.5, 1.0, 0.2, 1.0]  # experts 1, 3, 5 tie for the top
    z = jnp.asarray([[1.0, 0.0, 0.0, 0.0]], jnp.bfloat16)
    gates, idx = moe.route(z, jnp.asarray(w), 2, Numerics())
    assert idx.tolist() == [[1, 3]]
    probs = np.exp(w[0]) / np.exp(w[0]).sum()
    np.testing.assert_allclose(np.asarray(gates)[0], probs[[1, 3]], rtol=1e-6)
    assert float(gates.sum()) < 1.0  # not renormalised


def test_route_orders_by_decreasing_gate():
    z = jax.random.normal(jax.random.PRNGKey(0), (32, 16))
    w = jax.random.normal(jax.random.PRNGKey(1), (16, 8))
    gates, idx = moe.route(z, w, 2, Numerics())
    logits = np.asarray(z, np.float32) @ np.asarray(w, np.float32)
    want = np.argsort(-logits, axis=-1, kind="stable")[:, :2]
    assert (np.asarray(idx) == want).all()
    assert (np.asarray(gates)[:, 0] >= np.asarray(gates)[:, 1]).all()


def test_unknown_strategy_is_an_error():
    with pytest.raises(ValueError, match="unknown MoE strategy"):
        moe.choose_strategy("sparse", 4, 2, 8, "cpu")


def test_requested_gather_gives_way_to_auto_beyond_decode_sized_steps():
    rows = moe.GATHER_MAX_ROWS // 2  # tokens with k = 2: exactly the limit
    assert moe.choose_strategy("gather", rows, 2, 8, "cpu") == "gather"
    assert (
        moe.choose_strategy("gather", rows + 1, 2, 8, "cpu")
        == moe.choose_strategy("auto", rows + 1, 2, 8, "cpu")
        != "gather"
    )
    assert moe.choose_strategy("grouped", 1, 2, 8, "cpu") == "grouped"  # the others are always kept
