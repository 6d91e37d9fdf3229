"""The default install works without TensorFlow: each test runs a program in a subprocess where
`import tensorflow` fails as if TF were not installed, and checks that it never loaded."""
import glob
import os
import struct
import subprocess
import sys
import textwrap

import numpy as np
import conftest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The path finder no longer finds tensorflow: `import tensorflow` raises ModuleNotFoundError and
# importlib.util.find_spec('tensorflow') is None, as on a machine without it.
NO_TF = textwrap.dedent("""
    import importlib.machinery, sys
    _find = importlib.machinery.PathFinder.find_spec
    def _no_tf(cls, name, path=None, target=None):
      return None if name.partition(".")[0] == "tensorflow" else _find(name, path, target)
    importlib.machinery.PathFinder.find_spec = classmethod(_no_tf)
    import atexit
    atexit.register(lambda: print("TF LOADED" if "tensorflow" in sys.modules else "TF ABSENT"))
""")


def _run_without_tf(program, timeout, devices=8):
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS=conftest.xla_flags(devices))
  proc = subprocess.run([sys.executable, "-c", NO_TF + textwrap.dedent(program)], cwd=REPO,
                        env=env, capture_output=True, text=True, timeout=timeout)
  assert proc.returncode == 0, proc.stderr[-4000:]
  assert proc.stdout.strip().endswith("TF ABSENT"), proc.stdout[-2000:]
  return proc.stdout


def test_the_blocker_blocks():
  _run_without_tf("""
      try:
        import tensorflow
        raise SystemExit("tensorflow was imported")
      except ModuleNotFoundError:
        pass
  """, timeout=60)


def test_input_engines_and_tensorboard_without_tf(tmp_path):
  """Every grain source (folder, embedded, TFDS through tfds.data_source), eval, worker
  processes, and the TensorBoard writer."""
  out = _run_without_tf(f"""
      import io
      import numpy as np
      from PIL import Image
      import tensorflow_datasets as tfds
      from sit_jax import data, metrics

      def png(value):
        out = io.BytesIO()
        Image.fromarray(np.full((9, 7, 3), value, np.uint8)).save(out, format="PNG")
        return out.getvalue()

      import os
      os.makedirs("{tmp_path}/images/a")
      for i in range(5):
        with open(f"{tmp_path}/images/a/{{i}}.png", "wb") as f:
          f.write(png(i))
      kw = dict(global_batch_size=4, image_size=8, seed=0, process_index=0, process_count=1)
      if __name__ == "__main__":
        for source in ("embedded:digits", "folder:{tmp_path}/images"):
          batch = next(data.pretrain_iterator(source, "train", workers=1, **kw))
          assert batch["view1"].shape == (4, 8, 8, 3), source
        examples = [dict(image=png(i), label=i % 10) for i in range(6)]
        with tfds.testing.mock_data(as_data_source_fn=lambda *a, **k: examples):
          assert next(data.pretrain_iterator("cifar10", "train", **kw))["label"].shape == (4,)
          assert len(list(data.eval_iterator("cifar10", "test", global_batch_size=4,
                                             image_size=8, process_index=0,
                                             process_count=1))) == 2
        w = metrics.MetricWriter("{tmp_path}/work", total_steps=1, global_batch_size=1,
                                 is_main_process=True)
        w.write_scalars(1, {{"loss": 0.5}})
        w.write_images(1, "recon", np.zeros((4, 4, 3), np.uint8))
        w.close()
        print("OK")
  """, timeout=300)
  assert "OK" in out
  assert glob.glob(str(tmp_path / "work" / "tb" / "events.out.tfevents.*"))


def test_quickstart_without_tf(tmp_path):
  """README's quickstart command, shortened to a few steps, on one CPU device as on a laptop
  (the 8-device runs are test_pretrain_e2e's; one device compiles and steps faster). The flags
  are test_notebook's pretraining run's (2 steps, a row each): the same programs, so whichever
  of the two runs second takes them from the session's compilation cache (34 -> 16 CPU s)."""
  _run_without_tf(f"""
      import runpy, sys
      sys.argv = ["sit_jax.main", "--config=configs/sit_vits.py:runlocal",
                  "--workdir={tmp_path}/run", "--config.total_steps=2", "--config.log_every=1"]
      try:
        runpy.run_module("sit_jax.main", run_name="__main__")
      except SystemExit as e:
        if e.code:
          raise
  """, timeout=900, devices=1)
  assert os.path.exists(tmp_path / "run" / "metrics.jsonl")


def _events(path):
  """The Event protos of a TensorBoard event file (TFRecord framing: length, crc, data, crc)."""
  from tensorboardX.proto import event_pb2
  with open(path, "rb") as f:
    raw = f.read()
  events, at = [], 0
  while at < len(raw):
    (length,) = struct.unpack("<Q", raw[at:at + 8])
    events.append(event_pb2.Event.FromString(raw[at + 12:at + 12 + length]))
    at += 12 + length + 4
  return events


def test_tensorboard_scalars_and_images(tmp_path):
  from PIL import Image
  import io
  from sit_jax import metrics
  img = np.random.default_rng(0).integers(0, 256, (6, 5, 3), dtype=np.uint8)
  w = metrics.MetricWriter(tmp_path, total_steps=3, global_batch_size=2, is_main_process=True)
  w.write_scalars(3, {"loss": 0.25})
  w.write_images(3, "recon/view1", img)
  w.close()
  (path,) = glob.glob(str(tmp_path / "tb" / "events.out.tfevents.*"))
  values = [(e.step, v) for e in _events(path) for v in e.summary.value]
  scalars = {(step, v.tag): v.simple_value for step, v in values if v.HasField("simple_value")}
  assert scalars == {(3, "loss"): 0.25}
  (picture,) = [v.image for _, v in values if v.HasField("image")]
  decoded = np.asarray(Image.open(io.BytesIO(picture.encoded_image_string)))
  np.testing.assert_array_equal(decoded, img)
