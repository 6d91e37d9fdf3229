"""Shared defaults of every sit_jax experiment; each config file overrides what makes it itself.

`get_config(arg)` of a config file receives the text after the colon in
`--config=configs/file.py:arg`, parsed here into key=value pairs ("runlocal" alone is a flag).
"""
from __future__ import annotations

import difflib

import ml_collections

# Sharding rules: (regex over the '/'-joined state path, rule); see sit_jax/sharding.py.
REPLICATED = (("", "replicate"),)
FSDP = ((r"kernel$", "fsdp"), (r"pos_embed$", "fsdp"), ("", "replicate"))
# Tensor parallelism over mesh.model (Megatron's split of each block: qkv and fc1 by output
# features, proj and fc2 by input features), FSDP over mesh.fsdp; works for any mix of sizes.
TENSOR_PARALLEL = ((r"(attn/qkv|mlp/fc1)/kernel$", ("fsdp", "model")),
                   (r"(attn/qkv|mlp/fc1)/bias$", ("model",)),
                   (r"(attn/proj|mlp/fc2)/kernel$", ("model", "fsdp")),
                   *FSDP)
# Activations: (logical axis, mesh axes) pairs; the batch over data x fsdp and, with
# mesh.model > 1, the heads and MLP features over model. sit_jax.sharding.LOGICAL_AXIS_RULES
# (a test checks they agree; configs stay free of jax).
LOGICAL_AXIS_RULES = (("batch", ("data", "fsdp")), ("heads", "model"), ("mlp", "model"))
# FSDP on TPU: libtpu's windowed einsums (each sharded matmul fused with its all-gather or
# reduce-scatter) run late and keep activations live until then, so FSDP needed more per chip
# than data parallelism; off, it needs less (README, "Will it fit"). TPU options: left out on
# CPU and GPU.
FSDP_COMPILER_OPTIONS = ("xla_tpu_enable_windowed_einsum_for_all_gather=false,"
                         "xla_tpu_enable_windowed_einsum_for_reduce_scatter=false")


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
  """'runlocal,head=mlp' -> ConfigDict(runlocal=True, head='mlp', ...defaults).

  An unknown key or a value of the wrong type is an error, so that a typo never silently runs
  the default experiment. A boolean may be given as its bare name ('runlocal'). runlocal runs on
  the embedded digits: with dataset= as well, one of the two would be ignored, an error too.
  """
  values = dict(runlocal=False, **defaults)
  given = set()
  for item in filter(None, (arg or "").split(",")):
    key, equals, text = (part.strip() for part in item.partition("="))
    if key not in values:
      nearest = difflib.get_close_matches(key, values, n=1)
      raise ValueError(f"Unknown config argument {key!r}"
                       f"{f' (did you mean {nearest[0]!r}?)' if nearest else ''}; valid "
                       f"arguments: {', '.join(sorted(values))}.")
    if key in given:  # the last would win silently
      raise ValueError(f"Config argument {key} is given twice: give it once.")
    values[key] = _parse_value(key, text if equals else None, values[key])
    given.add(key)
  if values["runlocal"] and "dataset" in given:
    raise ValueError(f"Config arguments runlocal and dataset={values['dataset']}: runlocal runs "
                     "on the embedded digits, so drop one (a short run on the dataset: "
                     "--config.total_steps=N).")
  return ml_collections.ConfigDict(values)


def _parse_value(key: str, text: str | None, default):
  """The value of config argument `key` as text (None: the bare name), typed as its default."""
  if isinstance(default, bool):
    words = {"1": True, "true": True, "yes": True, "0": False, "false": False, "no": False}
    if text is None or text.lower() in words:
      return text is None or words[text.lower()]
    raise ValueError(f"Config argument {key}={text} is not a boolean: use {key}=true or "
                     f"{key}=false.")
  if text is None:
    raise ValueError(f"Config argument {key} needs a value: {key}={default}.")
  kind = {int: "an integer", float: "a number"}.get(type(default))
  try:
    return type(default)(text) if kind else text
  except ValueError:
    raise ValueError(f"Config argument {key}={text} is not {kind}, e.g. {key}={default}.") \
        from None


def pretrain_config() -> ml_collections.ConfigDict:
  """SiT on ImageNet-1K with ViT-S/16 and the paper's settings."""
  c = ml_collections.ConfigDict()
  c.experiment = "sit"          # 'gmml' (reconstruction), 'contrastive', or 'sit' (both).
  c.seed = 0

  c.data = ml_collections.ConfigDict()
  c.data.source = "tfds:imagenet2012"   # 'tfds:NAME', 'folder:/path' or 'embedded:digits'.
  c.data.split = "train"
  c.data.data_dir = ""                  # TFDS data_dir; empty: TFDS default.
  c.data.image_size = 224
  c.data.crop_scale = (0.2, 1.0)
  c.data.interpolation = "bicubic_antialias"  # as PIL; 'bicubic', 'bilinear': no antialiasing.
  c.data.flip = True                    # random horizontal flips (off where handedness matters).
  c.data.global_batch_size = 256
  c.data.engine = "grain"               # 'grain'; 'tf' for TFDS TFRecord (pip install 'sit_jax[tf]').
  c.data.workers = 0                    # grain worker processes; 0: threads of this process only.
  # 'device': the host decodes, the accelerator crops and resizes (sit_jax/resample.py, PIL's
  # pixels within one level): over twice the images per host core. 'host': PIL resizes.
  # 'auto': 'device' on GPUs and TPUs, 'host' on CPUs.
  c.data.resize_on = "auto"
  c.data.decoded_size = 0               # the decoded-image buffer's side; 0: 512 at 224 px.

  c.augment = ml_collections.ConfigDict()
  c.augment.preset = "sit"              # photometric views of SPEC: 'sit', 'gmml' or 'none'.
  c.augment.blur_sigma = (0.1, 2.0)     # Gaussian blur sigma range in pixels (DINO, at 224 px).

  c.model = ml_collections.ConfigDict()
  c.model.variant = "S/16"
  c.model.drop_path_rate = 0.1
  c.model.recons_blocks = ()            # GMML: (6, 8, 10, 12).
  c.model.dtype = "bfloat16"            # Compute dtype; parameters stay float32.
  c.model.attention = ""                # '' (XLA chooses), 'xla', or 'cudnn' (fused, GPU).
  c.model.remat = False                 # Recompute each block in the backward pass (memory).
  c.model.qkv_per_head = False          # qkv computed per head: the `model=N` argument sets it.
  c.model.recompute_gelu = False        # GELU recomputed in the backward pass (vit.Mlp): CPU.
  # Each kernel gathered again for the backward pass (FSDP; vit.kernel_read_again_in_backward):
  # the `fsdp` argument sets it.
  c.model.reshard_after_forward = False
  c.model.scan_layers = False           # One nn.scan over the blocks: compile time flat in depth.
  # True: the backbone standardises each image's channels first (vit.standardize_per_image), so
  # exposure and contrast, which a contrastive loss can use to tell images apart, are gone.
  c.model.standardize_input = False
  c.model.recon_hidden = 0              # 0: the backbone width.
  c.model.recon_depth = 3
  c.model.proj_hidden = 4096
  c.model.proj_dim = 256

  c.gmml = ml_collections.ConfigDict()
  c.gmml.enabled = False                # Corrupt even without a reconstruction loss.
  c.gmml.ratio = 0.5
  c.gmml.replace_ratio = 0.3
  c.gmml.fills = ("noise", "replace")
  c.gmml.replace_prob = 0.5
  c.gmml.align = 1
  # 'replace' donors come from groups of this many consecutive images of a view: the authors'
  # per-GPU batch (64). A group inside one device's share of the batch (global batch /
  # data-parallel devices images of each view) is copied there; 0, the whole view,
  # all-gathers every view to every device (bf16[1024,224,224,3] at B/16, batch 1024).
  c.gmml.donor_group = 64

  c.loss = ml_collections.ConfigDict()
  c.loss.alpha = 1.0                    # total = contrastive + alpha * reconstruction.
  c.loss.temperature = 0.2
  c.loss.recon_all_pixels = False

  c.teacher = ml_collections.ConfigDict()
  c.teacher.momentum = 0.996            # cosine to 1 over training.

  c.optim = ml_collections.ConfigDict()
  c.optim.base_lr = 5e-4                # scaled by global_batch_size / 256.
  c.optim.min_lr = 1e-6
  c.optim.warmup_epochs = 10.0
  c.optim.weight_decay = 0.04
  c.optim.weight_decay_end = 0.1
  c.optim.clip_norm = 3.0               # per parameter tensor.
  c.optim.b1 = 0.9
  c.optim.b2 = 0.999
  c.optim.eps = 1e-8

  c.total_epochs = 800.0
  c.total_steps = 0                     # > 0 overrides total_epochs.
  c.num_train_examples = 0              # 0: read from the dataset.

  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, model=1))
  c.sharding_rules = REPLICATED
  c.logical_axis_rules = LOGICAL_AXIS_RULES
  # XLA options of the training step, 'name=value,...'; xla_tpu_* (xla_gpu_*, xla_cpu_*) ones
  # apply only on that backend. The `fsdp` argument alone sets FSDP_COMPILER_OPTIONS.
  c.compiler_options = ""

  c.log_every = 50
  c.image_every = 1000                  # reconstruction grids under workdir/images.
  # k-NN top-1 of the student and teacher backbones on a held-out labelled split (DINO's
  # monitor; sit_jax/monitor.py), in the progress line, metrics.jsonl and TensorBoard.
  c.eval_every = 0                      # 0: off. ImageNet: e.g. 25_000 with a bank of train[:10%].
  c.eval = ml_collections.ConfigDict()
  c.eval.source = ""                    # '': data.source.
  c.eval.train_split = ""               # the labelled bank; '': data.split.
  c.eval.test_split = "validation"      # held out from pretraining.
  c.eval.resize_mode = "center_crop"    # evaluation view, as configs/knn.py for the dataset.
  c.eval.features = "cls"
  c.eval.k = 20
  c.eval.temperature = 0.07
  c.eval.batch_size = 256
  # Few-shot ridge on the same features (transfer/fewshot.py): mean test accuracy over
  # fewshot_seeds draws of n examples per class of the bank, for each n; () = off.
  c.eval.fewshot_shots = ()             # e.g. (5, 10).
  c.eval.fewshot_seeds = 3
  c.eval.fewshot_l2 = 2.0 ** -6         # fixed: the best 5/10-shot l2 of fewshot.py:runlocal.
  c.checkpoint_every = 1000
  c.keep_checkpoints = 3
  c.export_backbone = True
  return c


def parallelism(c: ml_collections.ConfigDict, fsdp: bool = False, model: int = 1):
  """The config arguments `fsdp` (parameters, optimizer state and batch over every device) and
  `model=N` (tensor parallelism over N devices, N dividing the heads), alone or together; without
  them, data parallelism."""
  if model < 1:
    raise ValueError(f"Config argument model={model}: the number of devices that split each "
                     "layer must be >= 1 (1: no tensor parallelism).")
  if fsdp:
    c.mesh.update(dict(data=1, fsdp=-1))
    c.sharding_rules = FSDP
    # Not with tensor parallelism as well: there turning windowed einsums off saves nothing
    # (B/16 fsdp,model=4 at batch 1024 on v5e:4x4: 14.38 GiB on, 14.37 off; remat 6.07, 6.52),
    # and the backward's own gathers cost a little (S/16 fsdp,model=2 on cpu:8: 6890 -> 6903
    # MiB of temporaries, against 5578 -> 5512 with FSDP alone).
    if model == 1:
      c.compiler_options = FSDP_COMPILER_OPTIONS
      c.model.reshard_after_forward = True
  if model > 1:
    c.mesh.model = model
    c.sharding_rules = TENSOR_PARALLEL
    # Split the qkv kernel by heads, not the qkv activations (vit.QkvProjection: B/16 + remat at
    # batch 1024 on v5e:4x4, 14.47 -> 7.08 GiB per chip).
    c.model.qkv_per_head = True
  return c


def shrink_for_runlocal(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The same experiment at laptop size: the micro ViT on the embedded digits, ~5 CPU minutes.

  Every value below was chosen on a validation split (pretraining and k-NN bank on
  train[:1200], scored on train[1200:]); benchmarks/learning.md has the study and its figures.
  """
  c.data.source = "embedded:digits"
  c.data.split = "train"
  # The digits are 8x8 at source: 16 px keeps every detail, and with patch 4 a 4x4 grid of 16
  # tokens costs a quarter of 32 px (64 tokens), so 4x the images fit the budget
  # (k-NN 0.47 -> 0.56 at the same number of steps, with 4x the batch).
  c.data.image_size = 16
  # Batch 64 for 2,000 steps, not 128 for 1,000: the same images in the same minutes, twice the
  # updates (k-NN 0.923 -> 0.942 on validation, mean of two seeds, drop path 0 in both).
  c.data.global_batch_size = 64
  c.data.flip = False                  # digits have a handedness: flips cost 0.1 k-NN.
  # Crops of 80-100% of the image, not the paper's 20-100%: at 16 px a smaller crop cuts away
  # much of an object that fills few tokens (validation k-NN, (0.5, 1) -> (0.8, 1): MNIST digits
  # 0.78 -> 0.88, the letters 0.21 -> 0.45, these digits 0.948 -> 0.958; two seeds each, one
  # for MNIST's (0.5, 1); (0.9, 1) read the same on one seed). benchmarks/learning.md,
  # "Seventh round".
  c.data.crop_scale = (0.8, 1.0)
  # The accelerator's resize, as on GPUs and TPUs, so that the quickstart and the tests run the
  # path real runs take; the 32 x 32 digits make it free on a CPU.
  c.data.resize_on = "device"
  c.data.decoded_size = 32
  c.augment.preset = "gmml"            # light jitter, rare blur: colour means nothing here.
  c.model.variant = "Mu/4"
  c.model.dtype = "float32"
  # Each image standardised in the backbone: on the digits a tie (validation k-NN 0.947 against
  # 0.937 / 0.947 for two seeds without), on data whose exposure varies the difference between
  # learning and not (benchmarks/learning.md, "Beyond the digits").
  c.model.standardize_input = True
  # No stochastic depth for 4 blocks and a short run: k-NN 0.885 -> 0.923 on validation (two
  # seeds each); the paper's 0.1 is for ViT-S over 800 epochs.
  c.model.drop_path_rate = 0.0
  c.model.proj_hidden = 256
  c.model.proj_dim = 64
  c.model.recon_hidden = 0
  if c.model.recons_blocks:
    c.model.recons_blocks = (2, 3, 4)
  c.gmml.align = 1                     # 2: a tie on the letters (four seeds); 4 was worse.
  # Masked pixels filled with zeros, not the paper's noise or another image's pixels: a tie on
  # the digits (validation k-NN 0.948 against 0.942, linear 0.968 both; two seeds) and more on
  # small objects (the letters: k-NN 0.164 -> 0.222, linear 0.220 -> 0.324; four seeds).
  c.gmml.fills = ("zeros",)
  c.gmml.donor_group = 0               # 'replace' donors from the whole view, where asked for.
  # SiT corrupts 30% of the tokens, not the paper's 0.5: with these crops, at or above 0.5 in
  # every validation read (k-NN / linear, means of seeds 0 and 1: MNIST 0.878 -> 0.886,
  # 0.918 -> 0.930; the letters 0.454 -> 0.527, 0.555 -> 0.628; the digits 0.959 -> 0.962,
  # 0.970 -> 0.984); benchmarks/learning.md, "Eighth round". GMML alone keeps its paper's 0.75
  # (not studied here).
  if c.experiment == "sit":
    c.gmml.ratio = 0.3
  # A short run: a faster teacher gives better targets sooner (k-NN of the teacher 0.64 -> 0.83
  # at 600 steps); still cosine to 1.
  c.teacher.momentum = 0.96
  c.total_epochs = 0
  c.total_steps = 2000                 # ~107 epochs of the 1,200-1,500 training digits.
  c.optim.base_lr = 8e-3               # lr 2e-3 at batch 64, as at batch 128 (twice that lr
                                       # was no better there).
  # With the crops of 50-100% a quarter of it lifted the letters' k-NN 0.22 -> 0.28 but cost the
  # digits' 0.95 -> 0.89; with the crops below, half of it cost MNIST and the letters 0.03-0.05
  # (benchmarks/learning.md, "Eighth round"): the rate stays.
  c.optim.warmup_epochs = 10           # ~200 steps: 1 epoch cost 0.02 k-NN.
  # Adam's second moment averaged over ~20 steps (b2 0.95, MAE's), not ~1,000: the gradient norm
  # falls sixfold from step 100 to 800 (MNIST: 7.4 -> 1.2), and a 1,000-step average keeps the
  # early scale and shrinks the steps through much of a 2,000-step run. Every validation column
  # of MNIST and the letters up on both seeds (k-NN CLS, means of seeds 0 and 1: MNIST 0.886 ->
  # 0.919, the letters 0.527 -> 0.562; the mean patch token 0.83 -> 0.88, 0.39 -> 0.52), a tie
  # on the digits; benchmarks/learning.md, "Twelfth round".
  c.optim.b2 = 0.95
  c.log_every = 100
  c.image_every = 500
  c.checkpoint_every = 500
  c.eval_every = 500                   # a k-NN on the 297 test digits takes a few seconds.
  c.eval.train_split = "train"
  c.eval.test_split = "test"
  c.eval.resize_mode = "resize"
  c.eval.batch_size = 128
  return c
