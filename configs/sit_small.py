"""SiT pretraining on a small dataset, with the paper's small-data settings.

  --config=configs/sit_small.py:dataset=cifar10      (cifar10, cifar100, stl10, flowers, pets)

Small data: alpha = 5 (reconstruction weighted up), long schedules, ViT-S/16 on 224 px
(images are upscaled by the crop), global batch 256. STL-10 pretrains on train + unlabelled.
"""
from configs import common

# dataset: (TFDS source, pretraining split, epochs)
DATASETS = {
    "cifar10": ("tfds:cifar10", "train", 3000),
    "cifar100": ("tfds:cifar100", "train", 3000),
    "stl10": ("tfds:stl10", "train+unlabelled", 1000),
    "flowers": ("tfds:oxford_flowers102", "train+validation", 3000),
    "pets": ("tfds:oxford_iiit_pet", "train", 3000),
}


def get_config(arg=None):
  args = common.parse_arg(arg, dataset="cifar10")
  if args.dataset not in DATASETS:
    raise ValueError(f"Unknown dataset {args.dataset!r} for sit_small: choose one of "
                     f"{sorted(DATASETS)}.")
  source, split, epochs = DATASETS[args.dataset]
  c = common.pretrain_config()
  c.experiment = "sit"
  c.data.source = source
  c.data.split = split
  c.total_epochs = epochs
  c.loss.alpha = 5.0
  c.checkpoint_every = 2000
  if args.runlocal:
    c = common.shrink_for_runlocal(c)
  return c
