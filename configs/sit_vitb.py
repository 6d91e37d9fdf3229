"""SiT on ImageNet-1K with ViT-B/16 (drop path 0.1, otherwise the ViT-S recipe).

Big models: set --config.model.remat=True to trade compute for memory,
--config.model.scan_layers=True to compile one block instead of twelve, and
--config.mesh.fsdp=N with --config.sharding_rules from common.FSDP to shard the state.
"""
from configs import common


def get_config(arg=None):
  args = common.parse_arg(arg)
  c = common.pretrain_config()
  c.experiment = "sit"
  c.model.variant = "B/16"
  if args.runlocal:
    c = common.shrink_for_runlocal(c)
  return c
