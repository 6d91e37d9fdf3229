"""SiT on ImageNet-1K with ViT-B/16 (drop path 0.1, otherwise the ViT-S recipe).

Big models: set --config.model.remat=True to trade compute for memory,
--config.model.scan_layers=True to compile one block instead of twelve, and the arguments
`fsdp` (state and batch over every device) and `model=N` (tensor parallelism over N devices)
to shard the state: --config=configs/sit_vitb.py:fsdp, :model=4 or :fsdp,model=4. `fsdp` also
turns libtpu's windowed einsums off (common.FSDP_COMPILER_OPTIONS): with them, FSDP needed more
per chip than data parallelism (README, "Will it fit": B/16 + remat at batch 1024 on v4:2x2x4
10.02 -> 2.64 GiB), and gathers each kernel again for the backward pass
(model.reshard_after_forward; README, "FSDP against data parallelism").
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
