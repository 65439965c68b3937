"""MoE routing: router logits ``[M, E]`` -> top-k expert ids and weights (pure JAX, jit-able).

Two scoring rules cover the common checkpoints:

* ``"softmax"`` (Mixtral, Qwen2/3-MoE, gpt-oss): ``p = softmax(logits)`` over all E experts; the
  top-k of ``p`` are selected; weights are the selected ``p``, divided by their sum when
  ``renormalize`` (Mixtral and Qwen3 with ``norm_topk_prob``; dividing the top-k of a softmax by
  their sum equals a softmax over the top-k logits).
* ``"sigmoid"`` (DeepSeek-V3/V4): ``s = sigmoid(logits)``; the *selection* score is
  ``s + correction_bias`` (the bias only steers which experts are picked); weights are the
  selected ``s`` (pre-bias), divided by their sum when ``renormalize``.

Either rule can be group-limited (``n_group > 1``): the E experts form ``n_group`` contiguous
groups of ``E / n_group``; a group's score is the sum of its two largest selection scores
(``group_score="top2_sum"``, DeepSeek-V3) or its largest (``"max"``, DeepSeek-V2); only the
experts of the ``topk_group`` best groups may be selected. Finally every weight is multiplied by
``routed_scaling_factor``.

Ties are broken deterministically: among equal scores (and equal group scores) the lower index
wins, as ``jax.lax.top_k`` does.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

SCORING_FUNCS = ("softmax", "sigmoid")
GROUP_SCORES = ("top2_sum", "max")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class RoutingConfig:
  """How router logits become top-k ids and weights (see the module docstring).

  All fields are static except ``correction_bias`` (a float ``[E]`` array or None), so a config
  can be passed through ``jax.jit`` as an ordinary argument.

  Attributes:
    top_k: experts per token.
    scoring: ``"softmax"`` or ``"sigmoid"``.
    renormalize: divide the top-k weights by their sum.
    n_group, topk_group: group-limited selection (``n_group == 1`` disables it).
    group_score: ``"top2_sum"`` or ``"max"``.
    routed_scaling_factor: multiplies every final weight.
    correction_bias: added to the scores for selection only (DeepSeek-V3's
      ``e_score_correction_bias``).
  """

  top_k: int = dataclasses.field(metadata=dict(static=True))
  scoring: str = dataclasses.field(default="softmax", metadata=dict(static=True))
  renormalize: bool = dataclasses.field(default=True, metadata=dict(static=True))
  n_group: int = dataclasses.field(default=1, metadata=dict(static=True))
  topk_group: int = dataclasses.field(default=1, metadata=dict(static=True))
  group_score: str = dataclasses.field(default="top2_sum", metadata=dict(static=True))
  routed_scaling_factor: float = dataclasses.field(default=1.0, metadata=dict(static=True))
  correction_bias: jax.Array | None = None

  @classmethod
  def softmax_topk(cls, top_k: int, *, renormalize: bool = True) -> RoutingConfig:
    """Mixtral / Qwen3-MoE (``renormalize=norm_topk_prob``) / gpt-oss routing."""
    return cls(top_k=top_k, scoring="softmax", renormalize=renormalize)

  @classmethod
  def deepseek_v3(cls, top_k: int, *, n_group: int, topk_group: int,
                  routed_scaling_factor: float, correction_bias: jax.Array | None = None,
                  renormalize: bool = True) -> RoutingConfig:
    """DeepSeek-V3/V4: sigmoid scores, bias for selection, top-2-sum group-limited top-k."""
    return cls(top_k=top_k, scoring="sigmoid", renormalize=renormalize, n_group=n_group,
               topk_group=topk_group, group_score="top2_sum",
               routed_scaling_factor=routed_scaling_factor, correction_bias=correction_bias)

  def validate(self, num_experts: int) -> None:
    """Raises ValueError/TypeError if this config cannot route over ``num_experts`` experts."""
    if not isinstance(self.top_k, (int, np.integer)) or self.top_k < 1:
      raise ValueError(f"RoutingConfig.top_k must be a positive int, got {self.top_k!r}")
    if self.top_k > num_experts:
      raise ValueError(f"RoutingConfig.top_k = {self.top_k} exceeds the number of experts "
                       f"E = {num_experts}")
    if self.scoring not in SCORING_FUNCS:
      raise ValueError(f"RoutingConfig.scoring must be one of {SCORING_FUNCS}, "
                       f"got {self.scoring!r}")
    if self.group_score not in GROUP_SCORES:
      raise ValueError(f"RoutingConfig.group_score must be one of {GROUP_SCORES}, "
                       f"got {self.group_score!r}")
    if self.n_group < 1 or num_experts % self.n_group:
      raise ValueError(f"RoutingConfig.n_group = {self.n_group} must be >= 1 and divide "
                       f"E = {num_experts}")
    if self.n_group > 1:
      per_group = num_experts // self.n_group
      if not 1 <= self.topk_group <= self.n_group:
        raise ValueError(f"RoutingConfig.topk_group = {self.topk_group} must be in "
                         f"[1, n_group = {self.n_group}]")
      if self.top_k > self.topk_group * per_group:
        raise ValueError(f"RoutingConfig.top_k = {self.top_k} exceeds the experts of the "
                         f"topk_group = {self.topk_group} selected groups "
                         f"({self.topk_group} x {per_group})")
    if self.correction_bias is not None:
      shape = tuple(np.shape(self.correction_bias))
      if shape != (num_experts,):
        raise ValueError(f"RoutingConfig.correction_bias must have shape ({num_experts},), "
                         f"got {shape}")
      if not jnp.issubdtype(jnp.result_type(self.correction_bias), jnp.floating):
        raise TypeError("RoutingConfig.correction_bias must be floating, got "
                        f"{jnp.result_type(self.correction_bias)}")


def route(router_logits: jax.Array, config: RoutingConfig) -> tuple[jax.Array, jax.Array]:
  """Selects ``config.top_k`` experts per token.

  Args:
    router_logits: float ``[..., E]`` (any float dtype; the math is float32).
    config: a ``RoutingConfig``.

  Returns:
    ``(topk_weights, topk_ids)``: float32 ``[..., top_k]`` and int32 ``[..., top_k]``. Column
    ``j`` holds the ``j``-th best expert by selection score (descending, lower index first on
    ties); weights follow the module docstring.
  """
  if not isinstance(config, RoutingConfig):
    raise TypeError(f"route: config must be a RoutingConfig, got {type(config).__name__}")
  logits = jnp.asarray(router_logits)
  if logits.ndim < 1:
    raise ValueError("route: router_logits must be [..., E], got a scalar")
  if not jnp.issubdtype(logits.dtype, jnp.floating):
    raise TypeError(f"route: router_logits must be floating, got {logits.dtype}")
  num_experts = logits.shape[-1]
  config.validate(num_experts)
  logits = logits.astype(jnp.float32)

  if config.scoring == "softmax":
    scores = jax.nn.softmax(logits, axis=-1)
  else:
    scores = jax.nn.sigmoid(logits)
  choice = scores
  if config.correction_bias is not None:
    choice = scores + jnp.asarray(config.correction_bias, jnp.float32)

  if config.n_group > 1:
    per_group = num_experts // config.n_group
    grouped = choice.reshape(*choice.shape[:-1], config.n_group, per_group)
    if config.group_score == "max" or per_group == 1:
      group_scores = jnp.max(grouped, axis=-1)
    else:
      group_scores = jnp.sum(jax.lax.top_k(grouped, 2)[0], axis=-1)
    _, top_groups = jax.lax.top_k(group_scores, config.topk_group)
    group_ok = jnp.any(top_groups[..., :, None] == jnp.arange(config.n_group), axis=-2)
    expert_ok = jnp.repeat(group_ok, per_group, axis=-1)
    choice = jnp.where(expert_ok, choice, -jnp.inf)

  _, topk_ids = jax.lax.top_k(choice, config.top_k)
  topk_weights = jnp.take_along_axis(scores, topk_ids, axis=-1)
  if config.renormalize:
    # The max only guards an all-underflowed sigmoid row; it never changes a normal row.
    topk_weights = topk_weights / jnp.maximum(jnp.sum(topk_weights, -1, keepdims=True), 1e-20)
  if config.routed_scaling_factor != 1.0:
    topk_weights = topk_weights * jnp.float32(config.routed_scaling_factor)
  return topk_weights.astype(jnp.float32), topk_ids.astype(jnp.int32)
