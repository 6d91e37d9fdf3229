"""SiT on ImageNet-1K with ViT-B/16 (drop path 0.1, otherwise the ViT-S recipe).

Big models: set --config.model.remat=True to trade compute for memory,
--config.model.scan_layers=True to compile one block instead of twelve, and the arguments
`fsdp` (state and batch over every device) and `model=N` (tensor parallelism over N devices)
to shard the state: --config=configs/sit_vitb.py:fsdp, :model=4 or :fsdp,model=4. FSDP + remat
on TPU v4 wants libtpu's windowed einsums off (config.compiler_options; README, "FSDP + remat on
v4": 9.48 -> 2.79 GiB per chip at batch 1024 on v4:2x2x4).
"""
from configs import common


def get_config(arg=None):
  args = common.parse_arg(arg, fsdp=False, model=1)
  c = common.pretrain_config()
  c.experiment = "sit"
  c.model.variant = "B/16"
  if args.runlocal:
    c = common.shrink_for_runlocal(c)
  return common.parallelism(c, args.fsdp, args.model)
