"""TPU splash-attention bridge (kernels_pallas/block_sparse_attention/splash.py), on CPU:
mask conversion is checked by dense evaluation, the kernel in Pallas interpret mode."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels_pallas.block_sparse_attention import (compile_layout,
                                                   dense_mask, dense_masked_attention,
                                                   resolve_impl, splash)
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

T = 256
CASES = [  # spec, expected splash mask type (None = any)
    ("causal", sm.CausalMask),
    ("causal&window:100", sm.LocalMask),
    ("window:50:7", sm.LocalMask),
    ("full", sm.FullMask),
    ("causal|window:3:5", sm.LogicalOr),
    ("bigbird:64:1:1:64", sm.NumpyMask),
    ("strided:64:32", sm.NumpyMask),
    ("heads(causal,causal&window:64)", None),
]


def _dense(mh, shape):
  return np.stack([np.asarray(m[(slice(0, shape[0]), slice(0, shape[1]))]) for m in mh.masks])


@pytest.mark.parametrize("spec,kind", CASES)
def test_mask_conversion_exact(spec, kind):
  h = 4
  layout = compile_layout(spec, T, T, 128, 128, num_heads=h)
  mh = splash.to_splash_mask(layout)
  assert len(mh.masks) == h
  got = _dense(mh, (T, T))
  assert np.array_equal(got, dense_mask(spec, T, T, num_heads=h))
  if kind is not None:
    assert all(type(m) is kind for m in mh.masks), [type(m).__name__ for m in mh.masks]


def test_per_head_masks_types():
  layout = compile_layout("heads(causal,causal&window:64,strided:64:32)", T, T, 128, 128,
                          num_heads=3)
  mh = splash.to_splash_mask(layout, num_heads=6)   # rows broadcast: head h uses h % 3
  assert [type(m) for m in mh.masks] == [sm.CausalMask, sm.LocalMask, sm.NumpyMask] * 2
  assert mh.masks[1].window_size == (64, 0)
  assert np.array_equal(_dense(mh, (T, T)),
                        dense_mask(layout.mask, T, T, num_heads=3)[np.arange(6) % 3])


def test_padding_keeps_band_computable_only_when_exact():
  t = 200  # not a multiple of 128: padded to 256
  causal = splash.to_splash_mask(compile_layout("causal", t, t, 128, 128), padded_shape=(256, 256))
  assert type(causal.masks[0]) is sm.CausalMask
  ahead = splash.to_splash_mask(compile_layout("window:4:4", t, t, 128, 128),
                                padded_shape=(256, 256))
  assert type(ahead.masks[0]) is sm.NumpyMask   # would see padded keys: dense with range check
  got = _dense(ahead, (256, 256))[0]
  assert not got[:, t:].any() and np.array_equal(got[:t, :t], dense_mask("window:4:4", t, t)[0])


def test_dispatch():
  assert resolve_impl("splash", 64, 128, 128) == "splash"
  if jax.default_backend() != "tpu":
    assert resolve_impl("auto", 64, 128, 128) != "splash"


def _qkv(t, h, kvh, d=64, b=2, seed=0):
  ks = jax.random.split(jax.random.key(seed), 3)
  return (jax.random.normal(ks[0], (b, t, h, d)), jax.random.normal(ks[1], (b, t, kvh, d)),
          jax.random.normal(ks[2], (b, t, kvh, d)))


@pytest.mark.parametrize("spec,kvh", [("causal", 4), ("causal&window:100", 2),
                                      ("bigbird:64:1:1:64", 4), ("strided:64:32", 1),
                                      ("heads(causal,causal&window:64)", 2)])
def test_interpret_parity(spec, kvh):
  h = 4
  layout = compile_layout(spec, T, T, 128, 128, num_heads=h)
  q, k, v = _qkv(T, h, kvh)
  out = splash.splash_attention(q, k, v, layout, interpret=True)
  ref = dense_masked_attention(q, k, v, layout.mask)
  np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=2e-5, rtol=2e-5)


def test_interpret_segments_and_padding():
  t, h = 200, 2
  layout = compile_layout("causal", t, t, 128, 128, num_heads=1)
  q, k, v = _qkv(t, h, h, seed=1)
  seg = jnp.asarray(np.repeat(np.array([[0, 1, 2, 3], [5, 5, 6, 6]]), 50, axis=1), jnp.int32)
  out = splash.splash_attention(q, k, v, layout, segment_ids=seg, interpret=True)
  ref = dense_masked_attention(q, k, v, layout.mask, segment_ids_q=seg, segment_ids_kv=seg)
  np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=2e-5, rtol=2e-5)


def test_interpret_empty_rows_are_zero():
  layout = compile_layout("~causal", T, T, 128, 128)   # row T-1 sees no key
  q, k, v = _qkv(T, 2, 2, b=1)
  out = splash.splash_attention(q, k, v, layout, interpret=True)
  ref = dense_masked_attention(q, k, v, layout.mask)
  np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=2e-5, rtol=2e-5)
