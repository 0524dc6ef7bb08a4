"""The Pallas kernels behind ``config.{memory,peer,moe}.impl`` inside the model: a tiny model
with ``impl="pallas"`` (interpret mode on this CPU) computes the same loss and the same
gradients as its ``impl="xla"`` twin, on one device and per shard on a (data, fsdp, tensor) mesh
of 8 fake devices, and a few training steps with the kernels track the XLA run."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from sparsejax.configure import load_config
from sparsejax.layers import kernel_impl
from sparsejax.models.transformer import build_model
from sparsejax.parallel.sharding import activation_sharding
from sparsejax.parallel.mesh import make_mesh
from sparsejax.layers import registry
from sparsejax.train.state import model_spec, param_shardings
from sparsejax.models.forward import forward_sums

VOCAB = 257
SMALL_PK = {"num_heads": 2, "top_k": 4, "d_key": 16}

# One block each, its FFN the family's layer: the kernels appear once in the forward and once in
# the backward program (a second block only added another copy of them to compile in interpret
# mode).
ONE_BLOCK = {"model.num_layers": 1}
FAMILIES = {
    # a memory layer (Memory+, shared value pool), 16^2 slots
    "memory": ("configs/memory.py:tiny",
               {**ONE_BLOCK, "ffn.overrides": ("0:memory",), "memory.num_slots": 16 ** 2,
                **{f"memory.{k}": v for k, v in SMALL_PK.items()}}),
    # PEER, relu gates in one variant below
    "peer": ("configs/peer.py:tiny",
             {**ONE_BLOCK, "peer.num_experts": 16 ** 2,
              **{f"peer.{k}": v for k, v in SMALL_PK.items()}}),
    "peer_relu": ("configs/peer.py:tiny",
                  {**ONE_BLOCK, "peer.num_experts": 16 ** 2, "peer.score": "relu",
                   **{f"peer.{k}": v for k, v in SMALL_PK.items()}}),
    # dropless token choice through the grouped matmul, with a shared expert
    "moe": ("configs/moe.py:tiny", {**ONE_BLOCK, "moe.dispatch": "dropless",
                                    "moe.num_shared_experts": 1}),
}
IMPL_KEY = {"memory": "memory.impl", "peer": "peer.impl", "peer_relu": "peer.impl",
            "moe": "moe.impl"}


def cfg_of(family, impl, **extra):
  path, overrides = FAMILIES[family]
  return load_config(path, **overrides, **{IMPL_KEY[family]: impl}, **extra)


def batch(b=4, t=32, seed=0):
  rng = np.random.default_rng(seed)
  tok = jnp.asarray(rng.integers(0, VOCAB, size=(b, t + 1)), jnp.int32)
  return {"inputs": tok[:, :-1], "targets": tok[:, 1:]}


def loss_fn(graphdef):
  def loss(params, data):
    sums, aux, _, _ = forward_sums(graphdef, params, data, z_loss=0.0)
    return sums["ce_sum"] / sums["count"] + aux
  return loss


def loss_and_grads(cfg, data, mesh=None):
  graphdef, state = nnx.split(build_model(cfg, VOCAB, seed=3))
  params = nnx.to_pure_dict(state)
  fn = jax.value_and_grad(loss_fn(graphdef))
  if mesh is None:
    return jax.jit(fn)(params, data)
  shardings = param_shardings(model_spec(cfg, VOCAB), mesh)
  params = jax.device_put(params, shardings)
  data = jax.device_put(data, NamedSharding(mesh, P(("data", "fsdp"))))
  with activation_sharding(mesh, registry.logical_rules(cfg.mesh)):
    return jax.jit(fn)(params, data)


_XLA_REFERENCE = {}


def xla_reference(family):
  """The ``impl="xla"`` twin's loss and gradients on ``batch()``, computed once per family (the
  one-device and the per-shard tests compare against the same reference)."""
  if family not in _XLA_REFERENCE:
    _XLA_REFERENCE[family] = loss_and_grads(cfg_of(family, "xla"), batch())
  return _XLA_REFERENCE[family]


def assert_trees_close(a, b, rtol, atol):
  la = jax.tree_util.tree_leaves_with_path(a)
  lb = jax.tree_util.tree_leaves(b)
  assert len(la) == len(lb)
  for (path, x), y in zip(la, lb):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol,
                               err_msg=jax.tree_util.keystr(path))


def test_impl_resolution():
  assert kernel_impl.resolve("xla", "config.x.impl", "gather") == "xla"
  assert kernel_impl.resolve("pallas", "config.x.impl", "gather") == "interpret"   # this CPU
  assert kernel_impl.resolve("interpret", "config.x.impl", "gather") == "interpret"
  assert kernel_impl.resolve("mosaic_interpret", "config.x.impl", "gather") == "mosaic_interpret"
  assert kernel_impl.resolve("mosaic_interpret", "config.x.impl", "topk") == "xla"  # no TPU kernel
  with pytest.raises(ValueError, match="config.x.impl: unknown impl 'cuda'"):
    kernel_impl.resolve("cuda", "config.x.impl", "gather")


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_pallas_model_matches_xla_model(family):
  data = batch()
  loss_x, grads_x = xla_reference(family)
  loss_p, grads_p = loss_and_grads(cfg_of(family, "pallas"), data)
  np.testing.assert_allclose(float(loss_p), float(loss_x), rtol=1e-5)
  assert_trees_close(grads_p, grads_x, rtol=2e-4, atol=2e-6)
  # the kernels' custom VJPs deliver gradient to every table / sub-key / expert weight
  for path, g in jax.tree_util.tree_leaves_with_path(grads_p):
    name = jax.tree_util.keystr(path)
    if any(k in name for k in ("values_NxD", "experts_in", "experts_out", "subkeys", "w_gate_E",
                               "w_down_E")):
      assert float(jnp.max(jnp.abs(g))) > 0, name


@pytest.mark.parametrize("family", ["memory", "peer", "moe"])
def test_tpu_kernel_model_matches_xla_model(family):
  """config impl "mosaic_interpret": the layers' Mosaic TPU kernels (memory / PEER gathers, the
  MoE grouped matmul) in TPU interpret mode, per shard on a data=2 x tensor=2 mesh (what
  impl="pallas" resolves to on a TPU, kernel_impl.resolve)."""
  data = batch()
  loss_x, grads_x = xla_reference(family)
  cfg = cfg_of(family, "mosaic_interpret", **{"mesh.data": 2, "mesh.tensor": 2})
  ffn = model_spec(cfg, VOCAB).abstract_model.blocks[0].ffn
  assert getattr(ffn, "gather_impl", ffn.impl) == "mosaic_interpret"  # the TPU kernels run
  loss_t, grads_t = loss_and_grads(cfg, data, mesh=make_mesh(cfg.mesh, jax.devices()[:4]))
  np.testing.assert_allclose(float(loss_t), float(loss_x), rtol=1e-5)
  assert_trees_close(grads_t, grads_x, rtol=2e-4, atol=2e-6)


@pytest.mark.parametrize("family", ["memory", "peer", "moe"])
def test_pallas_model_per_shard_on_a_mesh_matches_one_device(family):
  """data=2 x fsdp=2 x tensor=2: kernels run per batch shard under shard_map; value / expert
  columns (memory, PEER) and the expert hidden dimension (MoE) are split over "tensor"."""
  mesh_over = {"mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2}
  data = batch()
  loss_1, grads_1 = xla_reference(family)
  cfg = cfg_of(family, "pallas", **mesh_over)
  loss_8, grads_8 = loss_and_grads(cfg, data, mesh=make_mesh(cfg.mesh, jax.devices()[:8]))
  np.testing.assert_allclose(float(loss_8), float(loss_1), rtol=1e-5)
  assert_trees_close(grads_8, grads_1, rtol=2e-4, atol=2e-6)
