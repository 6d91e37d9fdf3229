"""GMML: reconstruction only (no contrastive head, no teacher) on ImageNet-1K with ViT-S/16.

GMML paper settings: corruption ratio 0.75, reconstruction from the average of blocks 6, 8, 10
and 12, crops with scale (0.05, 1), light photometric augmentation, weight decay 0.04 -> 0.4.
"""
from configs import common


def get_config(arg=None):
  args = common.parse_arg(arg)
  c = common.pretrain_config()
  c.experiment = "gmml"
  c.gmml.ratio = 0.75
  c.model.recons_blocks = (6, 8, 10, 12)
  c.data.crop_scale = (0.05, 1.0)
  c.augment.preset = "gmml"
  c.optim.weight_decay_end = 0.4
  if args.runlocal:
    c = common.shrink_for_runlocal(c)
  return c
