"""The SiT step in PyTorch, the way the authors run it, timed against the sit_jax step in one run.

  pip install -e '.[bench]'      # torch 2.14.1, torchvision 0.29.1, timm, safetensors
  python benchmarks/torch_reference.py                       # ViT-Ti/16, 224px, batch 8
  python benchmarks/torch_reference.py --model=s --rounds=5
  python benchmarks/torch_reference.py --dtype=bfloat16    # both sides in bf16 (CPU autocast)
  python benchmarks/torch_reference.py --config.model.remat=true   # more sit_jax knobs

PyTorch side (a re-implementation of the authors' recipe, not their code):
  input   per image on the CPU: torchvision RandomResizedCrop(224, 0.2-1, bicubic) + flip +
          ColorJitter(0.4, 0.4, 0.2, 0.1) p 0.8 + grayscale p 0.2 + PIL Gaussian blur (p 1 / 0.1)
          + solarize (view 2, p 0.2) + normalise; GMML noise blocks per image with numpy in a
          Python loop (area U(0.5, 0.5)); then, per image with probability 1/2, re-corrupted
          with blocks replaced from another image of the batch (area U(0.3, 0.3)).
  model   timm ViT (drop path 0.1) + reconstruction head (3 x Linear+GELU, ConvTranspose2d)
          + projection head (4096/4096/256 with BatchNorm); teacher forward on the clean views,
          student forward on the corrupted views, masked L1 + MoCo-v3 contrastive (tau 0.2, x 2 tau,
          symmetrised), backward, per-tensor gradient clipping at 3, AdamW, EMA of the teacher.
JAX side: the jitted sit_jax step (photometric augmentation and GMML inside it) on
device-resident synthetic uint8 views, and end to end with the real input pipeline (--e2e).

Both sides use the same number of threads (every core this process may run on), fp32, the same
shapes. Measurements alternate between the two sides in rounds so that load from other processes
falls on both; the medians are reported, with the process CPU time per step (less sensitive to
other processes than wall time) and `others_cpu`, the share of the machine's CPUs that other
processes used during the timed windows.
"""
from __future__ import annotations

import json
import math
import os
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, REPO)
sys.path.insert(0, HERE)

from absl import app, flags  # noqa: E402
from authors_input import AuthorsInput  # noqa: E402
from hostutil import checked_config, fail, parse_flags, pretrain_iterator  # noqa: E402
from ml_collections import config_flags  # noqa: E402
import numpy as np  # noqa: E402

from sit_jax import config_check  # noqa: E402

TIMM_MODELS = {"ti": ("vit_tiny_patch16_224", "Ti/16"), "s": ("vit_small_patch16_224", "S/16"),
               "b": ("vit_base_patch16_224", "B/16")}

# What the PyTorch side builds (TorchSiT, AuthorsInput), as sit_jax config values: a config that
# differs (e.g. `:runlocal`'s small heads) would time another model on the JAX side.
TORCH_SIDE = {"experiment": "sit", "model.drop_path_rate": 0.1, "model.recon_hidden": 0,
              "model.recon_depth": 3, "model.proj_hidden": 4096, "model.proj_dim": 256,
              "model.standardize_input": False, "loss.temperature": 0.2, "augment.preset": "sit",
              "gmml.ratio": 0.5, "gmml.replace_ratio": 0.3, "gmml.replace_prob": 0.5}

FLAGS = flags.FLAGS
GOAL_RATIO = 0.5  # sit_jax step / PyTorch step
# The goal is judged only on a quiet machine: another process on a core slows torch's spinning
# OpenMP threads far more than XLA (benchmarks/README.md: ratio 0.30 at others_cpu 52%).
QUIET_OTHERS_CPU = 0.05
config_flags.DEFINE_config_file("config", os.path.join(REPO, "configs", "sit_vits.py"),
                                "sit_jax config for the JAX side; --model, --batch, "
                                "--image_size override its model, batch and size.")
flags.DEFINE_enum("model", "ti", list(TIMM_MODELS), "ViT size (patch 16) on both sides.")
flags.DEFINE_integer("batch", 8, "Images per step (each gives two views).", lower_bound=1)
flags.DEFINE_integer("image_size", 224, "Crop size.")
flags.DEFINE_integer("source_size", 256, "Side of the synthetic source images the torch "
                     "pipeline crops from (decoding is not timed on either side).")
flags.DEFINE_integer("steps", 3, "Steps per timed window.", lower_bound=1)
flags.DEFINE_integer("rounds", 3, "Rounds; each times one window per side.", lower_bound=1)
flags.DEFINE_integer("warmup", 2, "Untimed steps per side first.", lower_bound=0)
flags.DEFINE_bool("e2e", True, "Also time the sit_jax step fed by its real input pipeline.")
flags.DEFINE_integer("threads", 0, "Threads for torch (0: every core this process may use).")
flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Compute dtype of both sides: "
                  "sit_jax model.dtype, torch autocast on the CPU for bfloat16. Parameters, "
                  "optimiser and losses stay float32 on both.")

# ---------------------------------------------------------------------------------------------
# CPU accounting.
# ---------------------------------------------------------------------------------------------


def _busy_jiffies():
  try:
    with open("/proc/stat") as f:
      fields = [int(v) for v in f.readline().split()[1:]]
  except OSError:
    return None
  idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
  return sum(fields[:8]) - idle


class Window:
  """Wall time, this process's CPU time, and the CPU share other processes took meanwhile."""

  def __enter__(self):
    self.busy0, self.cpu0, self.t0 = _busy_jiffies(), time.process_time(), time.perf_counter()
    return self

  def __exit__(self, *exc):
    self.wall = time.perf_counter() - self.t0
    self.cpu = time.process_time() - self.cpu0
    busy1 = _busy_jiffies()
    self.others = None
    if self.busy0 is not None and busy1 is not None:
      busy = (busy1 - self.busy0) / os.sysconf("SC_CLK_TCK")
      ncpu = os.cpu_count() or 1
      self.others = max(0.0, (busy - self.cpu) / (self.wall * ncpu))


# ---------------------------------------------------------------------------------------------
# PyTorch side.
# ---------------------------------------------------------------------------------------------


class TorchSiT:
  """Student, teacher, optimiser and the two halves of a step (CPU input work, model update)."""

  def __init__(self, model_name, image_size, batch, seed=0, dtype="float32"):
    import timm
    import torch
    from torch import nn

    torch.manual_seed(seed)
    self.torch, self.batch, self.size = torch, batch, image_size
    self.autocast = dtype == "bfloat16"

    def backbone(drop_path):
      return timm.create_model(model_name, pretrained=False, num_classes=0, img_size=image_size,
                               drop_path_rate=drop_path)

    class Net(nn.Module):
      def __init__(self, drop_path):
        super().__init__()
        self.backbone = backbone(drop_path)
        d = self.backbone.embed_dim
        self.patch = self.backbone.patch_embed.patch_size[0]
        self.recon = nn.Sequential(nn.Linear(d, d), nn.GELU(), nn.Linear(d, d), nn.GELU(),
                                   nn.Linear(d, d), nn.GELU())
        self.to_pixels = nn.ConvTranspose2d(d, 3, self.patch, self.patch)
        self.proj = nn.Sequential(
            nn.Linear(d, 4096), nn.BatchNorm1d(4096), nn.ReLU(inplace=True),
            nn.Linear(4096, 4096), nn.BatchNorm1d(4096), nn.GELU(),
            nn.Linear(4096, 256), nn.BatchNorm1d(256, affine=False))

      def forward(self, x, recon=True):
        tokens = self.backbone.forward_features(x)  # (B, 1 + N, D) after the final norm.
        proj = self.proj(tokens[:, 0])
        if not recon:
          return proj, None
        y = self.recon(tokens[:, 1:]).transpose(1, 2)
        g = int(math.isqrt(y.shape[-1]))
        return proj, self.to_pixels(y.unflatten(2, (g, g)))

    self.student, self.teacher = Net(0.1), Net(0.0)
    self.teacher.load_state_dict(self.student.state_dict())
    for p in self.teacher.parameters():
      p.requires_grad = False
    self.student.train()
    self.teacher.train()  # BatchNorm on batch statistics, as the authors' teacher.
    decay, no_decay = [], []
    for name, p in self.student.named_parameters():
      (no_decay if name.endswith(".bias") or p.ndim == 1 else decay).append(p)
    self.opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.04},
                                  {"params": no_decay, "weight_decay": 0.0}], lr=5e-4 * batch / 256)

    self.input = AuthorsInput(image_size, seed)

  def make_inputs(self, images):
    """PIL images -> (clean, corrupted, mask) tensors of both views, (2B, 3, S, S) each."""
    return tuple(map(self.torch.from_numpy, self.input(images)))

  def update(self, clean, corrupted, masks, momentum=0.996, temperature=0.2, clip=3.0):
    torch = self.torch
    F = torch.nn.functional
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.autocast):
      with torch.no_grad():
        t_proj, _ = self.teacher(clean, recon=False)
      s_proj, recon = self.student(corrupted)
    s_proj, t_proj, recon = s_proj.float(), t_proj.float(), recon.float()

    def contrastive(q, k):
      q, k = F.normalize(q, dim=1), F.normalize(k, dim=1)
      logits = q @ k.T / temperature
      return F.cross_entropy(logits, torch.arange(q.shape[0])) * 2 * temperature

    s1, s2 = s_proj.chunk(2)
    t1, t2 = t_proj.chunk(2)
    c_loss = contrastive(s1, t2) + contrastive(s2, t1)
    r_loss = F.l1_loss(recon, clean, reduction="none").mean(1)[masks == 1].mean()
    loss = c_loss + r_loss
    self.opt.zero_grad()
    loss.backward()
    for p in self.student.parameters():  # per-tensor clipping, as DINO's utils.clip_gradients
      if p.grad is not None:
        coef = clip / (p.grad.norm(2) + 1e-6)
        if coef < 1:
          p.grad.mul_(coef)
    self.opt.step()
    with torch.no_grad():
      for ps, pt in zip(self.student.parameters(), self.teacher.parameters()):
        pt.mul_(momentum).add_((1 - momentum) * ps.detach())
    return float(loss.detach())

  def step(self, images):
    """(input seconds, model seconds) of one step."""
    t0 = time.perf_counter()
    inputs = self.make_inputs(images)
    t1 = time.perf_counter()
    self.update(*inputs)
    return t1 - t0, time.perf_counter() - t1


def source_images(n, side, seed=0):
  from PIL import Image
  rng = np.random.default_rng(seed)
  # Smooth random images (not white noise) so that crops and blur see image-like content.
  small = rng.integers(0, 256, (n, side // 8, side // 8, 3), dtype=np.uint8)
  return [Image.fromarray(x).resize((side, side), Image.BILINEAR) for x in small]


# ---------------------------------------------------------------------------------------------
# The run.
# ---------------------------------------------------------------------------------------------


def median(xs):
  return statistics.median(xs) if xs else None


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  timm_name, variant = TIMM_MODELS[FLAGS.model]
  config = FLAGS.config  # the flags' model, batch and size first, so that the checks see them
  config.model.variant = variant
  config.data.image_size = FLAGS.image_size
  config.data.global_batch_size = FLAGS.batch
  config.model.dtype = FLAGS.dtype
  if config.data.source.startswith("tfds:imagenet"):  # for --e2e without ImageNet here.
    config.data.source = "embedded:digits"
  config = checked_config()
  values = config_check.flatten(config.to_dict())
  differs = [f"{key}={values.get(key)!r} (PyTorch's side: {want!r})"
             for key, want in TORCH_SIDE.items() if values.get(key) != want]
  if differs:
    fail(ValueError(f"the sit_jax step would not be the PyTorch step it is timed against: "
                    f"{', '.join(differs)}; use configs/sit_vits.py (no :runlocal) or set these."))
  threads = FLAGS.threads or len(os.sched_getaffinity(0))
  # torch, torchvision and timm before jax: triton (pulled in by torchvision) segfaults when
  # its LLVM loads after jaxlib's.
  import timm  # noqa: F401
  import torch
  import torchvision  # noqa: F401
  torch.set_num_threads(threads)
  import jax
  import throughput  # benchmarks/throughput.py
  from sit_jax import flops as flops_lib, sharding

  print(f"threads: torch {torch.get_num_threads()}, JAX/XLA CPU {threads} (cores this process "
        f"may use); machine {os.cpu_count()} CPUs", flush=True)

  # JAX: compile, warm up.
  mesh = sharding.make_mesh(config.mesh)
  state, step = throughput.build(config, mesh)
  batch = throughput.synthetic_batch(config, mesh)
  compiled, lower_s, compile_s = throughput.compile_step(step, state, batch)
  print(f"JAX compile {compile_s:.1f} s (lower {lower_s:.1f} s)", flush=True)
  state, _ = throughput.run_window(compiled, state, lambda: batch, FLAGS.warmup)
  if FLAGS.e2e:
    from sit_jax import data, resample
    it = pretrain_iterator(config)
    place = resample.batch_placer(mesh, config.data, FLAGS.image_size, data.view_keys(2))
    next_real = lambda: place(next(it))
    state, _ = throughput.run_window(compiled, state, next_real, 1)

  # PyTorch: build, warm up.
  ref = TorchSiT(timm_name, FLAGS.image_size, FLAGS.batch, dtype=FLAGS.dtype)
  images = source_images(FLAGS.batch, FLAGS.source_size)
  for _ in range(FLAGS.warmup):
    ref.step(images)

  rows = {"torch": [], "torch_input": [], "torch_model": [], "jax": [], "jax_e2e": []}
  cpu = {"torch": [], "jax": [], "jax_e2e": []}
  others = []

  def time_torch():
    parts = []
    with Window() as w:
      for _ in range(FLAGS.steps):
        parts.append(ref.step(images))
    rows["torch"].append(w.wall / FLAGS.steps)
    rows["torch_input"].append(sum(p[0] for p in parts) / FLAGS.steps)
    rows["torch_model"].append(sum(p[1] for p in parts) / FLAGS.steps)
    cpu["torch"].append(w.cpu / FLAGS.steps)
    return w

  def time_jax(name, next_batch):
    nonlocal state
    with Window() as w:
      state, _ = throughput.run_window(compiled, state, next_batch, FLAGS.steps)
    rows[name].append(w.wall / FLAGS.steps)
    cpu[name].append(w.cpu / FLAGS.steps)
    return w

  for r in range(FLAGS.rounds):
    order = ["torch", "jax"] if r % 2 == 0 else ["jax", "torch"]
    if FLAGS.e2e:
      order.append("jax_e2e")
    for side in order:
      if side == "torch":
        w = time_torch()
      elif side == "jax":
        w = time_jax("jax", lambda: batch)
      else:
        w = time_jax("jax_e2e", next_real)
      if w.others is not None:
        others.append(w.others)
      print(f"round {r + 1}/{FLAGS.rounds} {side:8s} {1e3 * w.wall / FLAGS.steps:8.0f} ms/step "
            f"(cpu {1e3 * w.cpu / FLAGS.steps:6.0f} ms; other processes "
            f"{'n/a' if w.others is None else f'{w.others:.0%}'} of the CPUs)", flush=True)

  torch_s, jax_s = median(rows["torch"]), median(rows["jax"])
  others_cpu = median(others)
  quiet = others_cpu is not None and others_cpu <= QUIET_OTHERS_CPU
  flops_per_step = flops_lib.sit_step_flops(config)
  result = {
      "benchmark": "torch_reference",
      "backend": jax.default_backend(), "device_kind": jax.devices()[0].device_kind,
      "model": variant, "timm_model": timm_name, "image_size": FLAGS.image_size,
      "global_batch": FLAGS.batch, "dtype": FLAGS.dtype,
      "threads": threads, "cpus": os.cpu_count(),
      "torch_version": torch.__version__, "jax_version": jax.__version__,
      "torch_step_ms": 1e3 * torch_s,
      "torch_input_ms": 1e3 * median(rows["torch_input"]),
      "torch_model_ms": 1e3 * median(rows["torch_model"]),
      "jax_step_ms": 1e3 * jax_s,
      "jax_e2e_step_ms": 1e3 * median(rows["jax_e2e"]) if rows["jax_e2e"] else None,
      "ratio_jax_over_torch": jax_s / torch_s,
      # Best windows of each side: the comparison least disturbed by other processes.
      "torch_step_ms_min": 1e3 * min(rows["torch"]),
      "jax_step_ms_min": 1e3 * min(rows["jax"]),
      "ratio_min_jax_over_torch": min(rows["jax"]) / min(rows["torch"]),
      "ratio_jax_e2e_over_torch": median(rows["jax_e2e"]) / torch_s if rows["jax_e2e"] else None,
      "goal_ratio": GOAL_RATIO,
      "goal_met": jax_s / torch_s <= GOAL_RATIO if quiet else None,
      "torch_cpu_ms": 1e3 * median(cpu["torch"]),
      "jax_cpu_ms": 1e3 * median(cpu["jax"]),
      "jax_e2e_cpu_ms": 1e3 * median(cpu["jax_e2e"]) if cpu["jax_e2e"] else None,
      "others_cpu": others_cpu,
      "jax_compile_s": compile_s,
      "analytic_gflop_per_step": flops_per_step / 1e9,
      "torch_gflop_per_s": flops_per_step / torch_s / 1e9,
      "jax_gflop_per_s": flops_per_step / jax_s / 1e9,
      "windows_ms": {k: [round(1e3 * v, 1) for v in vs] for k, vs in rows.items() if vs},
      "steps": FLAGS.steps, "rounds": FLAGS.rounds,
  }
  print(f"\n{'':14s}{'ms/step':>10s}{'cpu ms':>10s}")
  print(f"{'torch':14s}{result['torch_step_ms']:10.0f}{result['torch_cpu_ms']:10.0f}   "
        f"(input {result['torch_input_ms']:.0f}, model {result['torch_model_ms']:.0f})")
  print(f"{'sit_jax':14s}{result['jax_step_ms']:10.0f}{result['jax_cpu_ms']:10.0f}")
  if rows["jax_e2e"]:
    print(f"{'sit_jax e2e':14s}{result['jax_e2e_step_ms']:10.0f}{result['jax_e2e_cpu_ms']:10.0f}")
  verdict = ("met" if result["goal_met"] else "not met") if quiet else (
      f"not judged, only when other processes use at most {QUIET_OTHERS_CPU:.0%} of the CPUs")
  print(f"ratio sit_jax / torch = {result['ratio_jax_over_torch']:.2f} of the medians, "
        f"{result['ratio_min_jax_over_torch']:.2f} of the best windows (goal <= {GOAL_RATIO}: "
        f"{verdict}); other processes used "
        f"{'n/a' if others_cpu is None else format(others_cpu, '.0%')} of the CPUs")
  print(json.dumps(result))


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
