"""Block-size tuning table (tuning.choose), the cuDNN dense dispatch decision, and
``attention.block_q/block_kv = 0`` meaning "auto" in the model layer."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from kernels_pallas.block_sparse_attention import tuning
from kernels_pallas.block_sparse_attention.masks import parse_mask
from sparsejax.configure import load_config
from sparsejax.layers.block_sparse import BlockSparseAttention, dense_dispatch


@pytest.mark.parametrize("head_dim", [64, 128])
def test_choose_returns_table_entry_for_h200(head_dim):
  got = tuning.choose("NVIDIA H200", head_dim, 8192)
  assert got == tuning.TABLE[("H200", head_dim)]
  assert got.num_warps is not None


def test_choose_unknown_device_default():
  got = tuning.choose("SomeAccelerator 9000", 128, 8192)
  assert got == tuning.DEFAULT
  gpu = tuning.choose("NVIDIA L4", 128, 8192)
  assert gpu == tuning.DEFAULT_GPU
  for cfg in (got, gpu):
    assert cfg.block_q >= 16 and cfg.block_kv >= 16
    assert cfg.block_q & (cfg.block_q - 1) == 0 and cfg.block_kv & (cfg.block_kv - 1) == 0


@pytest.mark.parametrize("kind", ["NVIDIA H200", "NVIDIA H100 80GB HBM3", "NVIDIA A100-SXM4-80GB",
                                  "cpu", "unknown"])
@pytest.mark.parametrize("seq", [1, 8, 16, 17, 40, 64, 100, 128, 8192])
def test_choose_never_exceeds_padded_sequence(kind, seq):
  cap = max(16, 1 << max(0, seq - 1).bit_length())
  got = tuning.choose(kind, 128, seq)
  assert got.block_q <= cap and got.block_kv <= cap
  assert got.block_q >= 16 and got.block_kv >= 16


def test_dense_dispatch_plain_causal_any_density():
  for density in (0.01, 0.5, 0.9):
    assert dense_dispatch("causal", density, "gpu") == {"is_causal": True,
                                                        "implementation": "cudnn"}
  assert dense_dispatch(parse_mask("causal"), 0.5, "gpu", jnp.bfloat16) is not None


def test_dense_dispatch_causal_window_only_when_dense():
  kw = dense_dispatch("causal&window:128", 0.6, "gpu")
  assert kw == {"is_causal": True, "implementation": "cudnn", "local_window_size": (128, 0)}
  assert dense_dispatch("causal&window:128", 0.5, "gpu") is None
  assert dense_dispatch("causal&window:128", 0.1, "gpu") is None


@pytest.mark.parametrize("spec", ["bigbird:16:16:3:16:seed=0", "strided:16:16", "full",
                                  "window:16:16", "prefix:16"])
def test_dense_dispatch_none_for_non_causal_bands(spec):
  assert dense_dispatch(spec, 0.9, "gpu") is None


@pytest.mark.parametrize("platform", ["cpu", "tpu"])
def test_dense_dispatch_none_off_gpu(platform):
  assert dense_dispatch("causal", 0.9, platform) is None
  assert dense_dispatch("causal&window:128", 0.9, platform) is None


def test_dense_dispatch_none_for_float32():
  assert dense_dispatch("causal", 0.9, "gpu", jnp.float32) is None


def _layer(**overrides):
  cfg = load_config("configs/sparse_attn.py:tiny", **{"attention.sparse_impl": "xla",
                                                      **overrides})
  return BlockSparseAttention(cfg, 0, rngs=nnx.Rngs(params=0))


@pytest.mark.parametrize("auto", [{"attention.block_q": 0, "attention.block_kv": 0},
                                  {"attention.block_q": 0}])
def test_auto_blocks_match_explicit_blocks(auto):
  t = 64
  explicit, autolayer = _layer(), _layer(**auto)
  expect = tuning.choose(jax.devices()[0].device_kind, autolayer.head_dim, t)
  layout = autolayer.layout(t)
  assert layout.block_q == expect.block_q
  assert layout.block_kv == (expect.block_kv if "attention.block_kv" in auto
                             else explicit.block_kv)
  x = jax.random.normal(jax.random.key(0), (2, t, 64))
  pos = jnp.broadcast_to(jnp.arange(t), (2, t))
  np.testing.assert_allclose(np.asarray(autolayer(x, pos)), np.asarray(explicit(x, pos)),
                             atol=2e-5, rtol=2e-5)
