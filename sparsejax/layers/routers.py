"""MoE routers and router losses as pure functions (used by sparsejax/layers/moe.py).

All router math runs in float32. Shapes: N tokens (batch and sequence flattened, or per group),
E experts, K experts per token.

Token-choice routers return a ``Routing``: for every token its K experts ``expert_NxK``, their
gates ``gate_NxK`` (what multiplies the expert outputs), the normalised router probabilities
``probs_NxE`` (for the load-balance loss and the entropy metric) and the raw ``logits_NxE``
(z-loss). Expert choice selects tokens per expert instead (``expert_choice``).

Losses (each returned unscaled; the layer multiplies by ``config.moe.<name>``):

  * Switch load balance (Fedus et al. 2021, counted over the top-k assignments):
        L_lb = E * sum_e f_e * P_e,
        f_e = (1 / (N K)) * sum_n sum_k 1[expert_nk = e]    (fraction of assignments, no grad)
        P_e = (1 / N) * sum_n probs_ne                       (mean router probability)
    Perfectly uniform routing gives f_e = P_e = 1/E and L_lb = 1.
  * Router z-loss (ST-MoE, Zoph et al. 2022):  L_z = (1/N) * sum_n logsumexp_e(logits_ne)^2.
  * Importance (Shazeer et al. 2017): importance_e = sum_n gate_ne (0 where not selected);
        L_imp = CV(importance)^2 = var_e(importance) / mean_e(importance)^2  (population var).
  * Load (Shazeer et al. 2017, smooth estimator, needs the noisy router): with clean logits h,
    noisy logits h~ = h + sigma * eps, load_e = sum_n Phi((h_ne - thr_ne) / sigma_ne) where
    thr_ne is the K-th largest noisy logit of token n among the experts other than e;
    L_load = CV(load)^2.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np


class Routing(NamedTuple):
  expert_NxK: jax.Array   # int32 expert ids
  gate_NxK: jax.Array     # float32 gates
  probs_NxE: jax.Array | None   # normalised scores (rows sum to 1); None for hash routing
  logits_NxE: jax.Array | None  # raw router logits; None for hash routing


def scores(logits_NxE: jax.Array, score_fn: str) -> jax.Array:
  if score_fn == "softmax":
    return jax.nn.softmax(logits_NxE, axis=-1)
  if score_fn == "sigmoid":
    return jax.nn.sigmoid(logits_NxE)
  raise ValueError(f"unknown score_fn {score_fn!r}")


def token_choice(logits_NxE: jax.Array, k: int, *, score_fn: str = "softmax",
                 renormalize: bool = True, bias_E: jax.Array | None = None) -> Routing:
  """Top-k experts per token. ``bias_E`` (aux-loss-free balancing, DeepSeek-V3) is added to the
  scores for the selection only; gates are the unbiased scores of the selected experts, divided
  by their sum when ``renormalize``. Sigmoid probabilities for P_e / entropy are s / sum_e s."""
  logits_NxE = logits_NxE.astype(jnp.float32)
  s_NxE = scores(logits_NxE, score_fn)
  select_NxE = s_NxE if bias_E is None else s_NxE + jax.lax.stop_gradient(bias_E)
  _, expert_NxK = jax.lax.top_k(select_NxE, k)
  gate_NxK = jnp.take_along_axis(s_NxE, expert_NxK, axis=-1)
  if renormalize:
    gate_NxK = gate_NxK / (jnp.sum(gate_NxK, axis=-1, keepdims=True) + 1e-9)
  probs_NxE = s_NxE if score_fn == "softmax" else s_NxE / jnp.sum(s_NxE, -1, keepdims=True)
  return Routing(expert_NxK.astype(jnp.int32), gate_NxK, probs_NxE, logits_NxE)


def noisy_logits(clean_NxE: jax.Array, noise_logits_NxE: jax.Array, key: jax.Array):
  """Shazeer 2017: h~ = h + softplus(x W_noise) * N(0, 1). Returns (noisy logits, sigma)."""
  sigma_NxE = jax.nn.softplus(noise_logits_NxE.astype(jnp.float32))
  eps = jax.random.normal(key, clean_NxE.shape, jnp.float32)
  return clean_NxE.astype(jnp.float32) + sigma_NxE * eps, sigma_NxE


def cv_squared(x_E: jax.Array) -> jax.Array:
  mean = jnp.mean(x_E)
  return jnp.var(x_E) / (mean * mean + 1e-10)


def importance_loss(routing: Routing, num_experts: int) -> jax.Array:
  importance_E = jnp.zeros((num_experts,), jnp.float32).at[routing.expert_NxK.reshape(-1)].add(
      routing.gate_NxK.reshape(-1))
  return cv_squared(importance_E)


def smooth_load(clean_NxE, noisy_NxE, sigma_NxE, k: int) -> jax.Array:
  """Shazeer's differentiable load estimate per expert (see module docstring)."""
  top_NxK1, _ = jax.lax.top_k(noisy_NxE, k + 1)
  kth, k1th = top_NxK1[:, k - 1:k], top_NxK1[:, k:k + 1]
  in_top = noisy_NxE >= kth  # expert e is among the top k: the threshold excluding e is the k+1th
  thr_NxE = jnp.where(in_top, k1th, kth)
  prob = jax.scipy.stats.norm.cdf((clean_NxE - thr_NxE) / (sigma_NxE + 1e-9))
  return jnp.sum(prob, axis=0)


def load_fraction(expert_NxK: jax.Array, num_experts: int) -> jax.Array:
  """f_e: fraction of the N*K assignments that went to expert e (float32, sums to 1)."""
  counts = jnp.zeros((num_experts,), jnp.float32).at[expert_NxK.reshape(-1)].add(1.0)
  return counts / expert_NxK.size


def load_balance_loss(routing: Routing, num_experts: int) -> jax.Array:
  f_E = jax.lax.stop_gradient(load_fraction(routing.expert_NxK, num_experts))
  p_E = jnp.mean(routing.probs_NxE, axis=0)
  return num_experts * jnp.sum(f_E * p_E)


def z_loss(logits_NxE: jax.Array) -> jax.Array:
  return jnp.mean(jnp.square(jax.nn.logsumexp(logits_NxE.astype(jnp.float32), axis=-1)))


def entropy(probs_NxE: jax.Array) -> jax.Array:
  """Mean over tokens of -sum_e p log p (nats)."""
  return jnp.mean(-jnp.sum(probs_NxE * jnp.log(probs_NxE + 1e-20), axis=-1))


def update_expert_bias(bias_E: jax.Array, load_E: jax.Array, rate: float) -> jax.Array:
  """DeepSeek-V3 aux-loss-free balancing, applied after a step from that step's load:
  bias_e += rate * sign(mean(load) - load_e) (underloaded experts become more attractive)."""
  return bias_E + rate * jnp.sign(jnp.mean(load_E) - load_E).astype(bias_E.dtype)


# ---- expert choice ----

def expert_choice(logits_GxSxE: jax.Array, capacity: int, score_fn: str = "softmax"):
  """Zhou et al. 2022: every expert takes its top-``capacity`` tokens within each group (one
  sequence). Scores are softmax over experts per token (or sigmoid). Returns (token index
  ``G x E x C`` int32, gate ``G x E x C`` float32, scores ``G x S x E``). Non-causal: a token's
  selection depends on the scores of later tokens in its group."""
  s_GxSxE = scores(logits_GxSxE.astype(jnp.float32), score_fn)
  gate_GxExC, tok_GxExC = jax.lax.top_k(jnp.swapaxes(s_GxSxE, 1, 2), capacity)
  return tok_GxExC.astype(jnp.int32), gate_GxExC, s_GxSxE


# ---- hash routing (Roller et al. 2021) ----

def random_hash_table(vocab: int, num_experts: int, num_hashes: int, seed: int) -> np.ndarray:
  """``num_hashes x vocab`` expert ids: for each token id, ``num_hashes`` distinct experts drawn
  uniformly (seeded numpy, identical on every host and construction). Row j is hash function j;
  its first rows do not depend on ``num_hashes``."""
  rng = np.random.default_rng(seed)
  perm_VxE = np.argsort(rng.random((vocab, num_experts)), axis=1)
  return np.ascontiguousarray(perm_VxE[:, :num_hashes].T).astype(np.int32)


def balanced_hash_table(freq_V: np.ndarray, num_experts: int, num_hashes: int) -> np.ndarray:
  """Greedy bin packing: token ids in decreasing frequency each go to the currently least-loaded
  expert (lowest index on ties) not already used for that id; repeated for every hash. With
  uniform frequencies (no counts available) this is a round robin, i.e. balanced by id count."""
  freq_V = np.asarray(freq_V, np.float64)
  order = np.argsort(-freq_V, kind="stable")
  table = np.zeros((num_hashes, freq_V.size), np.int32)
  for h in range(num_hashes):
    load = np.zeros(num_experts)
    for v in order:
      masked = load.copy()
      masked[table[:h, v]] = np.inf
      e = int(np.argmin(masked))
      table[h, v] = e
      load[e] += freq_V[v]
  return table


@functools.lru_cache(maxsize=64)
def hash_table(hash_type: str, vocab: int, num_experts: int, num_hashes: int, seed: int,
               freq_path: str = "") -> np.ndarray:
  """Cached constant table (never a parameter); rebuilt deterministically from its arguments."""
  if hash_type == "random":
    return random_hash_table(vocab, num_experts, num_hashes, seed)
  freq = np.ones(vocab) if not freq_path else np.load(freq_path).astype(np.float64)
  if freq.shape != (vocab,):
    freq = np.resize(np.concatenate([freq, np.zeros(max(0, vocab - freq.size))]), vocab)
  return balanced_hash_table(freq, num_experts, num_hashes)


def hash_routing(tokens_N: jax.Array, table_HxV: np.ndarray) -> Routing:
  """MultiHash routing (Roller et al. 2021) over segment experts: with H hashes every expert is
  split into H segments of its hidden units and segment j of expert e is routed expert e*H + j;
  hash j sends the token to segment j of expert table[j, token] (ids taken modulo the table
  size), gate 1, so the segments' outputs add up to one expert-sized FFN (the paper's
  concatenation of hidden units). H = 1: plain hash routing to table[0, token], gate 1."""
  h, v = table_HxV.shape
  expert_NxK = (jnp.asarray(table_HxV.T)[tokens_N.astype(jnp.int32) % v] * h
                + jnp.arange(h, dtype=jnp.int32))
  gate_NxK = jnp.ones(expert_NxK.shape, jnp.float32)
  return Routing(expert_NxK, gate_NxK, None, None)
