"""Multi-device NVFP4: sharding rules for the dense op, expert/tensor-parallel MoE.

* ``nvfp4_matmul`` is partitioned automatically (``jax_nvfp4.parallel.dense``): shard the weight
  with ``shard_weight`` / ``weight_shardings`` (N: column parallel, K: row parallel) and the
  tokens as you like; no weight is ever all-gathered.
* ``shard_moe_weights`` + ``sharded_fused_moe`` (``jax_nvfp4.parallel.moe``): expert parallel,
  tensor parallel, or both, with optional token sharding.
"""

from jax_nvfp4.parallel.dense import (check_weight_split, partitioned_matmul, shard_weight,
                                      weight_shardings)
from jax_nvfp4.parallel.moe import (ShardedMoEWeights, check_moe_split, gate_up_canonical,
                                    gate_up_per_shard, moe_state_specs, shard_moe_weights,
                                    sharded_fused_moe)

__all__ = ["ShardedMoEWeights", "check_moe_split", "check_weight_split", "gate_up_canonical",
           "gate_up_per_shard", "moe_state_specs", "partitioned_matmul", "shard_moe_weights",
           "shard_weight", "sharded_fused_moe", "weight_shardings"]
