"""How the model computes, decided once when it is built (`Numerics.choose`): the activation
dtype, which of the release's bf16 roundings happen, the backend the programs are compiled for,
and whether the native CPU kernels compute the products and row reductions. The layers receive
this object; nothing reads the backend or the environment while tracing.

The kernels (`grok1.kernels`) sum every product and every row in an order fixed per row, so with
them a request's numbers depend on its own tokens only: not on the other requests in the batch,
on its slot, on the prefill chunk or on the attended bucket (batch invariance). Without them
(accelerators, or `kernels=False`) XLA's dots and reductions choose their summation order from
the shapes of the whole batch, which moves results in their last bits. On a mesh of several
devices (`Numerics.mesh`) each device runs the kernels on its own shard of the weights and the
batch (`grok1.kernels.sharded`), and partial sums are added over the devices in device order, so
a request's numbers depend on its own tokens and the mesh, not on the batch.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

F32 = jnp.float32
BF16 = jnp.bfloat16
DTYPES = {"bfloat16": BF16, "float32": F32}
# "release": the roundings the release's compiled program performs under XLA's default flags
# (its golden logits.npy); "strict": every rounding of SPEC.md §2 as written (what it computes
# with --xla_allow_excess_precision=false, logits_strict.npy); "fast": "release" with the int8
# weights used unrounded (not the release's numerics; faster on CPU). See `grok1.model.Grok1`.
ROUNDINGS = ("release", "strict", "fast")
BACKENDS = ("cpu", "gpu", "tpu")


@dataclasses.dataclass(frozen=True)
class Numerics:
    """Attributes:
    dtype: activations, "bfloat16" (the release) or "float32".
    rounding: "release", "strict" or "fast" (see ROUNDINGS and `grok1.model.Grok1`).
    backend: the platform the programs are compiled for ("cpu", "gpu", "tpu").
    kernels: the native CPU kernels compute every matrix product, attention product and row
      reduction of a cached step (batch invariance, see the module docstring).
    mesh: with the kernels, the mesh of several devices on whose shards they run (None: one
      device); the model's own mesh (`grok1.model.Grok1.mesh`).
    """

    dtype: str = "bfloat16"
    rounding: str = "release"
    backend: str = "cpu"
    kernels: bool = False
    mesh: jax.sharding.Mesh | None = None

    def __post_init__(self):
        for name, value, choices in (("dtype", self.dtype, tuple(DTYPES)),
                                     ("rounding", self.rounding, ROUNDINGS),
                                     ("backend", self.backend, BACKENDS)):  # fmt: skip
            if value not in choices:
                raise ValueError(f"{name} must be one of {choices}, got {value!r}")
        if self.kernels and self.backend != "cpu":
            raise ValueError(f"the native kernels run on the CPU, not on {self.backend!r}")
        if self.kernels:
            from grok1 import kernels as native

            if not native.available():  # builds and registers them on first use
                raise ValueError(f"the native CPU kernels cannot run here: {native.status()}")
        if self.mesh is not None and not self.kernels:
            raise ValueError("Numerics.mesh is where the kernels run; it needs kernels=True")

    @classmethod
    def choose(
        cls, dtype: str = "bfloat16", rounding: str = "release", kernels: bool | None = None,
        backend: str | None = None, mesh: jax.sharding.Mesh | None = None,
    ) -> Numerics:  # fmt: skip
        """The numerics for this process: the default backend, and the kernels wherever they
        can run (`kernels=None`: on the CPU when they are built; True insists, False refuses).
        `mesh`: the model's mesh (None, or one device: the kernels run on one device)."""
        from grok1 import kernels as native

        backend = backend or jax.default_backend()
        if kernels is None:
            kernels = backend == "cpu" and native.available()
        elif kernels and not (backend == "cpu" and native.available()):
            raise ValueError(f"the native CPU kernels cannot run here: {native.status()}")
        several = mesh is not None and mesh.devices.size > 1
        return cls(dtype, rounding, backend, bool(kernels), mesh if kernels and several else None)

    @property
    def compute_dtype(self):
        return DTYPES[self.dtype]

    def dots_in_f32(self, rows: int | None = None) -> bool:
        """Whether a product's bf16 operands are widened to float32 first (`layers.dot`).

        On CPU always: XLA:CPU runs bf16 dots and bf16 elementwise math several times slower
        than float32. On GPU for a product of one row (`rows` == 1: each (token, slot) product of
        the MoE's "gather" path, and the projections of a one-token step): XLA turns a one-row
        float32 dot into a reduction and fuses the int8 weight's dequantisation into it, so the
        weight is read once where it lies; as a bf16 dot, the weight is first dequantised into a
        bf16 copy (read 1 byte, write 2, read 2 per weight).
        """
        return self.backend == "cpu" or (self.backend == "gpu" and rows == 1)

    def rounded_for(self, quantized: bool) -> bool | None:
        """The `rounded` argument (`layers.dequantize`) of a matrix: False for an int8 matrix
        under "fast" (used as q * s exactly), None (the dtype's rule) otherwise."""
        return False if self.rounding == "fast" and quantized else None
