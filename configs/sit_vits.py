"""SiT (GMML reconstruction + contrastive) on ImageNet-1K with ViT-S/16: the paper's main recipe.

800 epochs, global batch 256 (64 x 4 GPUs in the paper), lr 5e-4 x batch/256, alpha = 1.
  python -m sit_jax.main --config=configs/sit_vits.py --workdir=DIR
  python -m sit_jax.main --config=configs/sit_vits.py:runlocal --workdir=DIR   # CPU, offline
Arguments `fsdp` and `model=N` shard the state (configs/sit_vitb.py); N divides ViT-S's
6 heads: 2, 3 or 6.
"""
from configs import common


def get_config(arg=None):
  args = common.parse_arg(arg, fsdp=False, model=1)
  c = common.pretrain_config()
  c.experiment = "sit"
  if args.runlocal:
    c = common.shrink_for_runlocal(c)
  return common.parallelism(c, args.fsdp, args.model)
