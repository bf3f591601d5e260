"""Every mesh gives the same tokens and logits (simulated CPU devices, in subprocesses)."""

from __future__ import annotations

import dataclasses
import json
import re
import subprocess
import sys

import numpy as np
import pytest

from tests.conftest import case_file, case_path, prompts_of, simulated_devices_env

CASE = "case3_release_layout_8dev"  # 48 query / 8 KV heads
SCRIPT = """
import json, sys, numpy as np, grok1
case, meshes = sys.argv[1], json.loads(sys.argv[2])
t, l = np.load(case + '/tokens.npy'), np.load(case + '/lengths.npy')
prompts = [t[b, : l[b]].tolist() for b in range(len(l))]
out = {}
gate = "grok1/layers/decoder_layer/moe/gate"
for mesh in meshes:
    axes = {k: v for k, v in mesh.items() if k not in ("expert_parallel", "generate")}
    try:
        m = grok1.load(case, mesh=axes, expert_parallel=mesh.get("expert_parallel", False))
    except ValueError as e:
        out[json.dumps(mesh)] = {"error": str(e)}
        continue
    out[json.dumps(mesh)] = {
        "logits": m.logits(t, l)[0, : l[0]].tolist(),
        "expert_spec": str(tuple(m.params[gate]["w"].sharding.spec)),
    }
    if mesh.get("generate"):
        out[json.dumps(mesh)]["tokens"] = m.generate(prompts, 8, ignore_eos=True)
print(json.dumps(out))
"""


def run_script(devices: int, script: str, *args: str) -> dict:
    """Runs `script` on `devices` virtual CPU devices; returns the JSON of its last line."""
    proc = subprocess.run(
        [sys.executable, "-c", script, *args], env=simulated_devices_env(devices),
        capture_output=True, text=True,
        timeout=500,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run_meshes(devices: int, meshes) -> dict:
    return run_script(devices, SCRIPT, case_path(CASE), json.dumps(meshes))


def axes_of(mesh: str) -> dict:
    return {k: v for k, v in json.loads(mesh).items() if k in ("data", "model")}


@pytest.mark.slow
def test_meshes_agree_on_tokens_and_logits():
    """Logits on every mesh; the engine's greedy tokens on the two meshes a user runs (model
    parallel, and data x model), since generation adds no mesh-dependent step of its own."""
    meshes = [{"data": 1, "model": 1}, {"data": 1, "model": 8, "generate": True},
              {"data": 2, "model": 4, "generate": True}, {"data": 8, "model": 1},
              {"data": 1, "model": 8, "expert_parallel": True},
              {"data": 2, "model": 4, "expert_parallel": True}]  # fmt: skip
    results = run_meshes(8, meshes)
    ep16 = {"data": 1, "model": 16, "expert_parallel": True}  # 16 does not divide 8 experts
    results.update(run_meshes(16, [{"data": 1, "model": 16}, ep16]))
    assert "does not divide them" in results.pop(json.dumps(ep16))["error"]
    expected = case_file(CASE, "greedy_runner.npy").tolist()
    base = np.array(results[json.dumps(meshes[0])]["logits"])
    generated = 0
    for mesh, r in results.items():
        assert "error" not in r, (mesh, r)
        if json.loads(mesh).get("generate"):
            assert r["tokens"] == expected, mesh
            generated += 1
        assert np.abs(np.array(r["logits"]) - base).max() <= 0.25, mesh
        if "expert_parallel" in mesh:  # whole experts split over "model", the same values
            assert r["expert_spec"] == "(None, 'model', None, None)", (mesh, r["expert_spec"])
            (plain,) = [m for m in results if m != mesh and axes_of(m) == axes_of(mesh)]
            assert r["logits"] == results[plain]["logits"], mesh
    assert generated == 2
    assert len(prompts_of(CASE)) == 1


def test_mesh_that_does_not_divide_heads_is_a_clear_error():
    results = run_meshes(8, [{"data": 1, "model": 5}, {"data": 3, "model": 4}])
    assert "does not divide the 48 query heads" in results['{"data": 1, "model": 5}']["error"]
    assert "needs 12 devices but only 8" in results['{"data": 3, "model": 4}']["error"]


def test_expert_parallel_needs_a_mesh_and_splits_experts_whole():
    """Expert parallelism moves the model axis of the experts' matrices (and scales) from F to
    E; every other parameter is placed as without it."""
    from jax.sharding import AbstractMesh

    import grok1
    from grok1 import sharding
    from grok1.config import ModelConfig
    from grok1.model import MOE, WeightFormats, param_table

    with pytest.raises(ValueError, match="needs a mesh"):
        grok1.load(case_path(CASE), expert_parallel=True)
    config = ModelConfig.load(case_path(CASE))
    table = param_table(config, WeightFormats.release(config))
    mesh = AbstractMesh((2, 4), ("data", "model"))
    plain = sharding.table_shardings(table, config, mesh, sharding.RULES)
    experts = sharding.table_shardings(table, config, mesh, sharding.EXPERT_PARALLEL_RULES)
    f_split = {  # [L, E, in, out] and scales [L, E, groups, out]: F split, or (down) whole
        (f"{MOE}/gate", "w"): (None, None, None, "model"),
        (f"{MOE}/gate", "scales"): (None, None, None, "model"),
        (f"{MOE}/up", "w"): (None, None, None, "model"),
        (f"{MOE}/up", "scales"): (None, None, None, "model"),
        (f"{MOE}/down", "w"): (None, None, "model", None),
        (f"{MOE}/down", "scales"): (None, None, None, None),
    }
    for key in table:
        spec, ep_spec = tuple(plain[key].spec), tuple(experts[key].spec)
        if key in f_split:
            assert (spec, ep_spec) == (f_split[key], (None, "model", None, None)), key
        else:
            assert ep_spec == spec, key
    assert set(f_split) <= set(table)


EMBED_SCRIPT = """
import json, jax, jax.numpy as jnp, numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
from grok1 import sharding
from grok1.model import _embed
V, D = 64, 16
rng = np.random.default_rng(0)
bf16 = jnp.asarray(rng.standard_normal((V, D)), jnp.float32).astype(jnp.bfloat16)
tables = {"bf16": bf16, "bits": jax.lax.bitcast_convert_type(bf16, jnp.uint16),
          "f32": bf16.astype(jnp.float32)}
out = []
for spec in ({"data": 1, "model": 8}, {"data": 2, "model": 4}):
    mesh = sharding.make_mesh(spec)
    edges = sorted({0, V - 1, *range(V // 8 - 1, V, V // 8), *range(V // 8, V, V // 8)})
    for name, table in tables.items():
        table = jax.device_put(table, NamedSharding(mesh, P("model", None)))
        for tokens in ([[V - 1]], [[3, V // 2]], np.reshape(edges, (2, -1)).tolist()):
            tokens = jnp.asarray(tokens, jnp.int32)
            lookup = jax.jit(lambda t, x: _embed(t, x, mesh)).lower(table, tokens).compile()
            hlo = lookup.as_text()
            out.append({"case": [spec, name, tokens.shape],
                        "equal": bool(np.array_equal(lookup(table, tokens), _embed(table, tokens))),
                        "all_gather": "all-gather" in hlo, "all_reduce": "all-reduce" in hlo})
print(json.dumps(out))
"""


def test_embedding_lookup_stays_on_the_vocabulary_shards():
    """With the vocabulary split over "model", each device looks up its own rows and the rows
    are summed (an all-reduce of [B, T, D]); the table itself never moves. Bit-equal to a plain
    lookup for bf16, bf16-bits and float32 tables, one token or many, tokens at shard edges."""
    results = run_script(8, EMBED_SCRIPT)
    assert len(results) == 18
    for r in results:
        assert r["equal"], r["case"]
        assert r["all_reduce"] and not r["all_gather"], r["case"]


# -- the one mesh parser (run.py --mesh, python -m grok1.plan --mesh, grok1.load(mesh=...)) -------
def test_parse_mesh_reads_the_command_line_form():
    from grok1 import sharding

    assert sharding.parse_mesh("data=1,model=8") == {"data": 1, "model": 8}
    assert sharding.parse_mesh(" model = 4 ") == {"model": 4}
    assert sharding.parse_mesh("data=2,model=-1") == {"data": 2, "model": -1}


@pytest.mark.parametrize(
    "text, message",
    [("", "empty"), ("data=1,", "'' is not AXIS=SIZE"), ("model", "'model' is not AXIS=SIZE"),
     ("=4", "'=4' is not AXIS=SIZE"), ("data=x", "size 'x' of axis 'data' is not an integer"),
     ("data=1.5", "is not an integer"), ("experts=2", "unknown axes ['experts']"),
     ("data=1,data=2", "axis 'data' is given twice"), ("model=0", "must be >= 1"),
     ("model=-2", "must be >= 1 (or -1 for the rest of the devices), got -2")],
)  # fmt: skip
def test_parse_mesh_rejects(text, message):
    from grok1 import sharding

    with pytest.raises(sharding.ShardingError, match=f"^mesh {text!r}: .*{re.escape(message)}"):
        sharding.parse_mesh(text)


def test_mesh_sizes_fill_the_rest_of_the_devices():
    from grok1 import sharding

    assert sharding.mesh_sizes(None, 8) == {"data": 1, "model": 8}
    assert sharding.mesh_sizes({}, 8) == {"data": 1, "model": 8}
    assert sharding.mesh_sizes({"data": 2}, 8) == {"data": 2, "model": 4}
    assert sharding.mesh_sizes({"model": 2, "data": -1}, 8) == {"data": 4, "model": 2}
    assert sharding.mesh_sizes({"data": 1, "model": 16}, 8) == {"data": 1, "model": 16}  # planned
    for spec, message in [
        ({"data": -1, "model": -1}, "all axes but one"),
        ({"data": 3}, "do not split into 3 x N"),
        ({"data": 1.0}, "must be an int, got 1.0"),
        ({"data": True}, "must be an int, got True"),
        ({"model": 0}, "must be >= 1"),
        ({"expert": 2}, "unknown axes ['expert']"),
    ]:
        with pytest.raises(sharding.ShardingError, match=re.escape(message)):
            sharding.mesh_sizes(spec, 8)


def test_make_mesh_takes_the_dict_or_the_text_and_checks_the_devices():
    import jax

    from grok1 import sharding

    devices = jax.devices()[:1] * 4  # shape checks only: the mesh is not used
    assert dict(sharding.make_mesh("data=2", devices).shape) == {"data": 2, "model": 2}
    assert dict(sharding.make_mesh({"model": 4}, devices).shape) == {"data": 1, "model": 4}
    with pytest.raises(sharding.ShardingError, match="needs 8 devices but only 4"):
        sharding.make_mesh("data=2,model=4", devices)


# -- one decision for the parameters and the KV cache ---------------------------------------
@pytest.mark.parametrize("model", [1, 4, 8, 16])
def test_kv_heads_are_split_or_whole_alike_for_parameters_and_cache(model):
    """8 KV heads: split over a model axis of up to 8 devices, whole on every device of a larger
    one; the key/value projections (as loading places them) and the cache follow suit."""
    from jax.sharding import AbstractMesh

    from grok1 import sharding
    from grok1.cache import KVCache
    from grok1.config import ModelConfig
    from grok1.model import ATTN, WeightFormats, param_table

    config = ModelConfig.load(case_path(CASE))
    assert (config.num_q_heads, config.num_kv_heads) == (48, 8)
    mesh = AbstractMesh((2, model), ("data", "model"))  # placement only: no devices needed
    table = param_table(config, WeightFormats.release(config))
    params = sharding.table_shardings(table, config, mesh)
    cache = KVCache.shapes(config, 4, 16, "bfloat16", mesh)
    kv = "model" if 1 < model <= 8 else None
    q = "model" if model > 1 else None
    assert tuple(params[(f"{ATTN}/key", "w")].spec) == (None, None, kv)
    assert tuple(params[(f"{ATTN}/value", "w")].spec) == (None, None, kv)
    assert tuple(params[(f"{ATTN}/query", "w")].spec) == (None, None, q)
    assert tuple(cache.k.sharding.spec) == tuple(cache.v.sharding.spec)
    assert tuple(cache.k.sharding.spec) == (None, "data", kv, None, None)
    assert tuple(cache.lengths.sharding.spec) == ("data",)


# -- memory per device -----------------------------------------------------------------------
@dataclasses.dataclass
class FakeDevice:
    limit: int | None
    id: int = 0
    device_kind: str = "FakeGPU"

    def memory_stats(self):
        return None if self.limit is None else {"bytes_limit": self.limit}


def test_preflight_error_names_need_and_capacity():
    from grok1 import sharding

    with pytest.raises(
        sharding.InsufficientMemoryError, match="needs 50 GB per device, this mesh has 40 GB"
    ):
        sharding.preflight(50 * 10**9, [FakeDevice(80 * 10**9), FakeDevice(40 * 10**9, id=1)])


def test_preflight_skips_devices_without_stats():
    """A device that reports no limit (the CPU) never fails the check; the others still do."""
    from grok1 import sharding

    sharding.preflight(50 * 10**9, [FakeDevice(80 * 10**9), FakeDevice(None, id=1)])
    sharding.preflight(10**15, [FakeDevice(None)])
    with pytest.raises(sharding.InsufficientMemoryError, match=r"has 80 GB \(FakeGPU 0\)"):
        sharding.preflight(90 * 10**9, [FakeDevice(None, id=1), FakeDevice(80 * 10**9)])
