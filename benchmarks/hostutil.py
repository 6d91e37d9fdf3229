"""Host helpers shared by the benchmarks: sit_jax.main's checks of --config, cores, CPU time, a
folder of photo-like JPEGs, the accelerator's share of the input pipeline."""
import os
import sys
import time

import numpy as np


def fail(error: BaseException):
  """Ends the benchmark with `error` in one line, as sit_jax.main does (SIT_JAX_TRACEBACK=1:
  raises it)."""
  if os.environ.get("SIT_JAX_TRACEBACK"):
    raise error
  raise SystemExit(f"{os.path.basename(sys.argv[0])}: error: {' '.join(str(error).split())}")


def parse_flags(argv: list[str]) -> list[str]:
  """app.run's flags parser for the benchmarks that take --config: as in sit_jax.main, the config
  file and its --config.KEY names are checked first, so that a mistake is one line."""
  from absl import flags
  from sit_jax import config_check
  try:
    argv = flags.FLAGS.read_flags_from_files(argv, force_gnu=False)
    return flags.FLAGS(config_check.check_command_line(argv))
  except Exception as e:  # everything that fails here is the command line's fault
    fail(e)


def checked_config():
  """FLAGS.config after sit_jax.main's checks of its values (one line for a bad one, before any
  work), with main's warning for each override the experiment does not read."""
  from absl import flags, logging
  from ml_collections import config_flags
  from sit_jax import config_check
  config = flags.FLAGS.config
  try:
    config_check.check(config)
  except config_check.ConfigError as e:
    fail(e)
  for warning in config_check.unread_overrides(
      config, config_flags.get_override_values(flags.FLAGS["config"])):
    logging.warning(warning)
  return config


def pretrain_iterator(config):
  """The input pipeline pretraining builds from `config` (sit_jax/pretrain.py), from step 0."""
  from sit_jax import data
  d = config.data
  return data.pretrain_iterator(
      d.source, d.split, global_batch_size=d.global_batch_size, image_size=d.image_size,
      crop_scale=tuple(d.crop_scale), seed=config.seed, data_dir=d.data_dir or None,
      interpolation=d.interpolation, flip=d.flip, **data.engine_options(d),
      **data.resize_options(d))


def usable_cores():
  return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def cpu_seconds():
  """User + system CPU seconds of this process and its live children (grain workers)."""
  import psutil
  me = psutil.Process()
  total = 0.0
  for p in [me, *me.children(recursive=True)]:
    try:
      t = p.cpu_times()
      total += t.user + t.system
    except psutil.Error:
      pass
  return total


def write_jpegs(folder, n, size=(500, 375), quality=90, seed=0):
  """n JPEGs of `size` in folder/photos/: random crops (60-100% of the side), flips and resizes
  of scikit-learn's two sample photos, so that they compress and decode like photographs."""
  from PIL import Image
  from sklearn.datasets import load_sample_images
  photos = [Image.fromarray(x) for x in load_sample_images().images]
  rng = np.random.default_rng(seed)
  os.makedirs(os.path.join(folder, "photos"), exist_ok=True)
  for i in range(n):
    src = photos[i % len(photos)]
    s = rng.uniform(0.6, 1.0)
    w, h = int(src.width * s), int(src.height * s)
    x, y = rng.integers(0, src.width - w + 1), rng.integers(0, src.height - h + 1)
    img = src.crop((x, y, x + w, y + h)).resize(size, Image.BICUBIC)
    if rng.random() < 0.5:
      img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    img.save(os.path.join(folder, "photos", f"{i:05d}.jpg"), quality=quality)
  return folder


def device_resize_cost(batch, size=224, repeats=3) -> dict:
  """resample.render_views on a batch of 500x375 images in the default decoded buffer: FLOPs per
  image (XLA's count) and milliseconds per image on jax's default device."""
  import jax
  import numpy as np
  from sit_jax import data, resample
  capacity = data.default_capacity(size)
  rng = np.random.default_rng(0)
  windows = [[data.crop_window(rng, 375, 500, (0.2, 1.0)) for _ in range(2)]
             for _ in range(batch)]
  decoded = dict(decoded=rng.integers(0, 256, (batch, capacity, capacity, 3), np.uint8),
                 extent=np.tile(np.int32([[375, 500]]), (batch, 1)),
                 window=np.asarray(windows, np.float32), flip=rng.random((batch, 2)) < 0.5)
  render = jax.jit(lambda b: resample.render_views(b, size, "bicubic_antialias",
                                                   data.view_keys(2)))
  decoded = jax.device_put(decoded)
  flops = render.lower(decoded).compile().cost_analysis()
  flops = (flops[0] if isinstance(flops, list) else flops).get("flops", 0.0)
  jax.block_until_ready(render(decoded))
  t0 = time.perf_counter()
  for _ in range(repeats):
    jax.block_until_ready(render(decoded))
  return dict(device=jax.devices()[0].device_kind, decoded_size=capacity,
              gflop_per_image=flops / batch / 1e9,
              ms_per_image=(time.perf_counter() - t0) / repeats / batch * 1e3)
