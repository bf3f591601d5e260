"""Tests for grok1.sampling against NumPy references written here."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from grok1.sampling import (
    BatchSamplingParams,
    SamplingParams,
    apply_repetition_penalty,
    filter_logits,
    make_seen_mask,
    sample,
    token_logprobs,
    top_logprobs,
    update_seen_mask,
)

sample_jit = jax.jit(sample)

# Logits of one V=8 row: positive and negative values, no ties.
ROW = np.array([2.0, 1.5, 1.2, 0.9, 0.3, -0.5, -1.0, 0.1], dtype=np.float32)


def reference_probs(logits, p: SamplingParams, seen=None):
    """NumPy float64 reference: penalty, temperature, top-k, top-p, min-p, renormalise."""
    x = np.asarray(logits, dtype=np.float64).copy()  # [V]
    if seen is not None:
        penalised = np.where(x > 0, x / p.repetition_penalty, x * p.repetition_penalty)
        x = np.where(seen, penalised, x)
    x = x / p.temperature
    order = np.argsort(-x, kind="stable")
    keep = np.zeros(x.shape, dtype=bool)
    k = p.top_k if p.top_k > 0 else x.size
    keep[order[:k]] = True
    probs = np.where(keep, np.exp(x - x.max()), 0.0)
    probs /= probs.sum()
    if p.top_p < 1.0:  # the fewest most-likely tokens with total >= top_p
        total, nucleus = 0.0, np.zeros_like(keep)
        for i in order:
            if keep[i] and total < p.top_p:
                nucleus[i] = True
                total += probs[i]
        keep = nucleus
    keep &= probs >= p.min_p * probs.max()
    probs = np.where(keep, probs, 0.0)
    return probs / probs.sum()


# ----------------------------------------------------------------------------- SamplingParams


@pytest.mark.parametrize(
    "field, value",
    [
        ("temperature", -0.1),
        ("temperature", float("nan")),
        ("temperature", float("inf")),
        ("top_p", 0.0),
        ("top_p", 1.5),
        ("top_k", -1),
        ("top_k", 2.5),
        ("min_p", -0.01),
        ("min_p", 1.01),
        ("repetition_penalty", 0.0),
        ("repetition_penalty", -1.0),
        ("seed", -1),
        ("seed", 2**64),
        ("logprobs", -1),
    ],
)
def test_params_validation(field, value):
    with pytest.raises(ValueError, match=f"SamplingParams.{field} must be .*got"):
        SamplingParams(**{field: value})


def test_params_defaults_are_greedy_and_valid():
    p = SamplingParams()
    assert p.greedy and p.top_p == 1.0 and p.top_k == 0 and p.logprobs == 0
    assert not SamplingParams(temperature=0.5, top_p=1, min_p=1, seed=2**64 - 1).greedy
    assert SamplingParams(temperature=np.float32(0.5), top_k=np.int64(3)).top_k == 3
    with pytest.raises(ValueError, match="top_k"):
        SamplingParams(top_k=True)


def test_tiny_temperature_is_finite_and_greedy():
    logits = _random_logits(8, 300, seed=7) * 100  # / 1e-37 overflows f32
    params = BatchSamplingParams.stack(
        [SamplingParams(temperature=1e-37, seed=s) for s in range(8)]
    )
    np.testing.assert_array_equal(sample_jit(logits, params, 0), jnp.argmax(logits, -1))


def test_stack_shapes_dtypes_and_keys():
    seeds = [0, 7, 2**32 - 1]
    batch = BatchSamplingParams.stack([SamplingParams(seed=s, top_k=3) for s in seeds])
    assert batch.batch_size == 3
    assert batch.temperature.dtype == jnp.float32 and batch.top_k.dtype == jnp.int32
    assert batch.key.shape == (3, 2) and batch.key.dtype == jnp.uint32
    for row, s in enumerate(seeds):
        np.testing.assert_array_equal(batch.key[row], jax.random.key_data(jax.random.PRNGKey(s)))
    leaves, treedef = jax.tree.flatten(batch)
    assert len(leaves) == 6
    assert jax.tree.unflatten(treedef, leaves) == batch
    with pytest.raises(ValueError, match="at least one"):
        BatchSamplingParams.stack([])


def test_set_row_replaces_one_row():
    batch = BatchSamplingParams.stack([SamplingParams(), SamplingParams(top_p=0.5)])
    new = batch.set_row(1, SamplingParams(temperature=0.3, top_k=4, seed=9))
    np.testing.assert_allclose(new.temperature, [0.0, 0.3])
    np.testing.assert_array_equal(new.top_k, [0, 4])
    np.testing.assert_allclose(new.top_p, [1.0, 1.0])
    np.testing.assert_array_equal(new.key, [[0, 0], [0, 9]])


# ----------------------------------------------------------------------------- greedy


def test_temperature_zero_is_argmax_first_index_on_ties():
    logits = jnp.array(
        [[0.0, 1.0, 3.0, 3.0, -1.0, 3.0], [5.0, 5.0, 0.0, 0.0, 0.0, 0.0]], dtype=jnp.bfloat16
    )
    params = BatchSamplingParams.stack([SamplingParams(seed=1), SamplingParams(seed=2)])
    tokens = sample_jit(logits, params, 0)
    assert tokens.dtype == jnp.int32
    np.testing.assert_array_equal(tokens, [2, 0])


def _random_logits(batch, vocab, seed=0):
    return jax.random.normal(jax.random.PRNGKey(seed), (batch, vocab), jnp.float32) * 3.0


@pytest.mark.parametrize(
    "policy",
    [
        dict(top_k=1),
        dict(top_p=1e-6),
        dict(min_p=1.0),
        dict(top_k=1, top_p=0.5, min_p=0.5),
    ],
)
def test_filters_that_leave_one_token_equal_greedy(policy):
    logits = _random_logits(64, 1000)
    params = BatchSamplingParams.stack(
        [
            SamplingParams(temperature=t, seed=s, **policy)
            for s, t in enumerate([0.5, 1.0, 3.0] * 21 + [1.0])
        ]
    )
    for step in (0, 5):
        np.testing.assert_array_equal(sample_jit(logits, params, step), jnp.argmax(logits, -1))


def test_greedy_and_sampled_rows_mix():
    logits = _random_logits(4, 500, seed=1)
    params = BatchSamplingParams.stack(
        [SamplingParams(), SamplingParams(temperature=1.0, seed=3)] * 2
    )
    tokens = np.asarray(sample_jit(logits, params, 0))
    greedy = np.asarray(jnp.argmax(logits, -1))
    assert tokens[0] == greedy[0] and tokens[2] == greedy[2]


# ----------------------------------------------------------------------------- distributions

VARIANTS = [
    SamplingParams(temperature=0.7, top_k=5, top_p=0.9, min_p=0.05),
    SamplingParams(temperature=0.7, top_k=5),
    SamplingParams(temperature=0.7, top_p=0.9),
    SamplingParams(temperature=0.7, min_p=0.05),
    SamplingParams(temperature=1.0),
    SamplingParams(temperature=1.3, top_p=0.8, min_p=0.2),
    SamplingParams(temperature=0.7, top_k=6, top_p=0.95, repetition_penalty=1.5),
]
SEEN = np.array([True, False, True, False, False, True, False, False])


def test_filter_logits_support_and_probs_match_reference():
    logits = np.stack([ROW] * len(VARIANTS))  # [B, V]
    params = BatchSamplingParams.stack(VARIANTS)
    penalised = apply_repetition_penalty(
        jnp.asarray(logits), jnp.asarray([SEEN] * 7), params.repetition_penalty
    )
    scaled = penalised / params.temperature[:, None]
    filtered = jax.jit(filter_logits)(scaled, params)
    probs = np.asarray(jax.nn.softmax(filtered, axis=-1))
    for row, p in enumerate(VARIANTS):
        want = reference_probs(ROW, p, SEEN)
        np.testing.assert_array_equal(probs[row] > 0, want > 0, err_msg=str(p))
        np.testing.assert_allclose(probs[row], want, atol=1e-6, err_msg=str(p))


def test_filter_logits_without_sorting_rows():
    """Only min-p / off rows: the branch that skips the sort."""
    variants = [SamplingParams(temperature=0.9, min_p=m) for m in (0.0, 0.1, 0.5)]
    variants.append(SamplingParams(top_k=2))  # greedy rows never need the sort
    logits = _random_logits(len(variants), 64, seed=3)
    params = BatchSamplingParams.stack(variants)
    scaled = logits / jnp.where(params.temperature > 0, params.temperature, 1.0)[:, None]
    probs = np.asarray(jax.nn.softmax(jax.jit(filter_logits)(scaled, params), axis=-1))
    for row, p in enumerate(variants[:3]):
        want = reference_probs(np.asarray(logits[row]), p)
        np.testing.assert_allclose(probs[row], want, atol=1e-6)
    assert np.count_nonzero(probs[3]) == 64


def test_empirical_frequencies_match_reference():
    n = 4000
    rows = [(v, i) for v in range(len(VARIANTS)) for i in range(n)]
    params = BatchSamplingParams.stack(
        [dataclasses.replace(VARIANTS[v], seed=1000 * v + i) for v, i in rows]
    )
    logits = jnp.asarray(np.tile(ROW, (len(rows), 1)))
    seen = jnp.asarray(np.tile(SEEN, (len(rows), 1)))
    tokens = np.asarray(sample_jit(logits, params, 3, seen)).reshape(len(VARIANTS), n)
    for v, p in enumerate(VARIANTS):
        want = reference_probs(ROW, p, SEEN)
        freq = np.bincount(tokens[v], minlength=ROW.size) / n
        assert np.all(freq[want == 0] == 0), (p, freq, want)
        assert np.max(np.abs(freq - want)) < 0.03, (p, freq, want)


# ----------------------------------------------------------------------------- randomness


def test_same_seed_same_tokens_at_any_batch_slot():
    vocab = 50
    target = SamplingParams(temperature=1.0, top_p=0.95, seed=42)
    others = [SamplingParams(temperature=0.8, top_k=10, seed=s) for s in (1, 2, 3)]
    row = _random_logits(1, vocab, seed=4)  # [1, V]
    filler = _random_logits(3, vocab, seed=5)
    for step in range(6):
        alone = int(sample_jit(row, BatchSamplingParams.stack([target]), step)[0])
        for slot in range(4):
            batch_params = others[:slot] + [target] + others[slot:]
            batch_logits = jnp.concatenate([filler[:slot], row, filler[slot:]])
            steps = jnp.array([99, 98, 97, 96]).at[slot].set(step)
            assert (
                int(sample_jit(batch_logits, BatchSamplingParams.stack(batch_params), steps)[slot])
                == alone
            )


def test_steps_and_seeds_change_draws():
    logits = jnp.zeros((1, 1000))  # uniform: repeated draws would be a bug
    params = BatchSamplingParams.stack([SamplingParams(temperature=1.0, seed=0)])
    by_step = {int(sample_jit(logits, params, s)[0]) for s in range(20)}
    assert len(by_step) > 15
    params = BatchSamplingParams.stack([SamplingParams(temperature=1.0, seed=s) for s in range(20)])
    assert len(set(np.asarray(sample_jit(jnp.zeros((20, 1000)), params, 0)).tolist())) > 15


# ----------------------------------------------------------------------------- penalty, logprobs


def test_repetition_penalty_matches_reference():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(3, 20)).astype(np.float32) * 2
    seen = rng.random((3, 20)) < 0.4
    penalty = np.array([1.0, 1.3, 0.7], dtype=np.float32)
    want = np.where(
        seen, np.where(logits > 0, logits / penalty[:, None], logits * penalty[:, None]), logits
    )
    got = apply_repetition_penalty(jnp.asarray(logits), jnp.asarray(seen), jnp.asarray(penalty))
    np.testing.assert_allclose(got, want, rtol=1e-6)


def test_repetition_penalty_changes_greedy_choice():
    logits = jnp.array([[3.0, 2.9, -1.0, -1.1]])
    seen = jnp.array([[True, False, False, False]])
    params = BatchSamplingParams.stack([SamplingParams(repetition_penalty=1.2)])
    assert int(sample_jit(logits, params, 0, seen)[0]) == 1  # 3.0 / 1.2 < 2.9
    assert int(sample_jit(logits, params, 0)[0]) == 0


def test_seen_mask_helpers():
    tokens = jnp.array([[1, 3, 3], [0, 2, 4]])
    valid = jnp.array([[True, True, True], [True, False, True]])
    mask = make_seen_mask(tokens, 5, valid)
    np.testing.assert_array_equal(
        mask, [[False, True, False, True, False], [True, False, False, False, True]]
    )
    mask = update_seen_mask(mask, jnp.array([0, 2]))
    np.testing.assert_array_equal(mask[:, [0, 2]], [[True, False], [True, True]])


def test_logprobs_match_numpy():
    logits = np.asarray(_random_logits(3, 30, seed=6))
    ref = logits - logits.max(-1, keepdims=True)
    ref = ref - np.log(np.exp(ref).sum(-1, keepdims=True))
    tokens = np.array([0, 7, 29])
    np.testing.assert_allclose(
        token_logprobs(jnp.asarray(logits), tokens), ref[np.arange(3), tokens], rtol=1e-5
    )
    values, ids = jax.jit(top_logprobs, static_argnums=1)(jnp.asarray(logits), 4)
    want_ids = np.argsort(-ref, axis=-1)[:, :4]
    assert ids.dtype == jnp.int32 and values.shape == (3, 4)
    np.testing.assert_array_equal(ids, want_ids)
    np.testing.assert_allclose(values, np.take_along_axis(ref, want_ids, -1), rtol=1e-5)
