"""Contrastive only (momentum teacher, MoCo-v3-style loss, no reconstruction) with ViT-S/16.

The SiT ablation without GMML: the student sees clean views (set --config.gmml.enabled=True to
feed it corrupted views while training only the contrastive loss).
"""
from configs import common


def get_config(arg=None):
  args = common.parse_arg(arg)
  c = common.pretrain_config()
  c.experiment = "contrastive"
  if args.runlocal:
    c = common.shrink_for_runlocal(c)
  return c
