"""The README's "will it fit" table: the SiT step compiled for TPU slices with --aot_topology.

  # libtpu in a venv of its own (README, "Will it fit": in the tests' one every process probes
  # for a TPU), seeing this environment's packages:
  python -m venv --system-site-packages /tmp/tpuvenv
  /tmp/tpuvenv/bin/pip install "jax[tpu]==$(python -c 'import jax; print(jax.__version__)')"
  JAX_PLATFORMS=cpu /tmp/tpuvenv/bin/python benchmarks/will_it_fit.py --out=/tmp/will_it_fit.jsonl
  python benchmarks/will_it_fit.py --only=B/16 --generation=v5e --out=...   # some rows

  python benchmarks/will_it_fit.py --scaling --out=/tmp/scaling.jsonl   # memory vs chips

Every row is one `sit_jax.aot.run` (what `python -m sit_jax.main --aot_topology=...` prints) of
configs/sit_vitb.py with the variant, batch, remat and parallelism of the row, which is the
config argument: data-parallel (none: mesh.data=-1, parameters replicated), `fsdp`, `model=4`
(tensor parallelism over 4 chips; B/16 and L/16 only, S/16 has 6 heads) or `fsdp,model=4`.
--scaling compiles one model and global batch for 4, 8 and 16 chips instead, to show how the
memory per chip of each parallelism falls with the chip count. Rows are appended to --out as
JSON lines as they finish (each compile takes minutes on a small host) and rows already there
are skipped; a row XLA refuses records its one-line reason. --markdown prints the table of a
file (with --scaling, the scaling table).
"""
from __future__ import annotations

import json
import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("out", "/tmp/will_it_fit.jsonl", "JSON lines, appended.")
flags.DEFINE_string("only", "", "Only this variant, e.g. 'B/16'.")
flags.DEFINE_string("generation", "", "Only the slices of this TPU generation, e.g. 'v5e'.")
flags.DEFINE_string("parallelism", "", "Only the rows of this parallelism: one of PARALLELISMS.")
flags.DEFINE_bool("scaling", False, "The memory-per-chip-against-chip-count rows (SCALING).")
flags.DEFINE_string("compiler_options", None, "config.compiler_options of every row instead of "
                    "the recipe's (FSDP: libtpu's windowed einsums off), e.g. '' for XLA's "
                    "defaults; recorded in the row.")
flags.DEFINE_string("markdown", "", "Print the table of this JSON-lines file and exit.")
flags.DEFINE_bool("scan_layers", False, "Compile one scanned block (model.scan_layers): about a "
                  "minute per row instead of 2-4 on a 2-core host; XLA then counts the blocks' "
                  "FLOPs once.")

# The config argument of configs/sit_vitb.py that selects each parallelism ("data": none).
PARALLELISMS = ("data", "fsdp", "model=4", "fsdp,model=4")
LABELS = {"data": "data", "fsdp": "FSDP", "model=4": "TP (model=4)",
          "fsdp,model=4": "FSDP + TP (model=4)"}
# (variant, global batch, slices, parallelisms): every slice of a model has the same number of
# chips; S/16's 6 heads do not divide a model axis of 4.
MODELS = (("B/16", 1024, ("v5e:4x4", "v4:2x2x4"), PARALLELISMS),
          ("L/16", 1024, ("v5e:4x4", "v4:2x2x4"), PARALLELISMS),
          ("S/16", 256, ("v5e:2x2", "v4:2x2x1"), ("data", "fsdp")))
# One model and global batch on 4, 8 and 16 v5e chips: at a fixed global batch the memory per
# chip of every parallelism should fall as chips are added.
SCALING = (("B/16", 256, True), ("v5e:2x2", "v5e:2x4", "v5e:4x4"))


def rows(generation: str = ""):
  """(variant, batch, remat, parallelism, topology): first the rows one would run (remat for
  ViT-L only), then the others."""
  if FLAGS.scaling:
    (variant, batch, remat), slices = SCALING
    candidates = [(variant, batch, remat, parallelism, topology)
                  for parallelism in PARALLELISMS for topology in slices]
  else:
    candidates = sorted(
        [(variant, batch, remat, parallelism, topology)
         for variant, batch, slices, parallelisms in MODELS for remat in (False, True)
         for parallelism in parallelisms for topology in slices],
        key=lambda r: r[2] != (r[0] == "L/16"))
  return [r for r in candidates
          if (not generation or r[4].startswith(generation + ":"))
          and (not FLAGS.only or r[0] == FLAGS.only)
          and (not FLAGS.parallelism or r[3] == FLAGS.parallelism)]


def config_for(variant: str, batch: int, remat: bool, parallelism: str):
  """configs/sit_vitb.py[:PARALLELISM] --config.model.variant=...
  --config.data.global_batch_size=... --config.model.remat=... [--config.model.scan_layers=True]"""
  from configs import sit_vitb
  c = sit_vitb.get_config(None if parallelism == "data" else parallelism)
  c.model.variant = variant
  c.data.global_batch_size = batch
  c.model.remat = remat
  c.model.scan_layers = FLAGS.scan_layers
  if FLAGS.compiler_options is not None:
    c.compiler_options = FLAGS.compiler_options
  return c


def measure(out: str):
  from sit_jax import aot
  todo = rows(FLAGS.generation)
  if not todo:
    raise SystemExit(
        f"will_it_fit: no row matches --only={FLAGS.only!r} (variants "
        f"{', '.join(m[0] for m in MODELS)}), --generation={FLAGS.generation!r} (v4, v5e) and "
        f"--parallelism={FLAGS.parallelism!r} (S/16 has no model=4 rows).")
  done = set()
  if os.path.exists(out):  # a row is done for its key compiled with the same settings
    with open(out) as f:
      done = {(tuple(row["key"]), row.get("scan_layers"), row.get("compiler_options"))
              for row in map(json.loads, f)}
  for key in todo:
    variant, batch, remat, parallelism, topology = key
    config = config_for(variant, batch, remat, parallelism)
    if (key, FLAGS.scan_layers, config.compiler_options) in done:
      continue
    row = {"key": key, "scan_layers": FLAGS.scan_layers,
           "compiler_options": config.compiler_options}
    try:
      figures = aot.run(config, topology)
      row.update(memory=figures["memory_bytes"], flops=figures["flops"],
                 analytic_flops=figures["analytic_flops"], loop=figures["loop"])
    except aot.DoesNotFit as e:
      print(e, flush=True)
      row["does_not_fit"] = str(e)
    except aot.TopologyUnavailable:  # no libtpu: every row would fail the same way
      import jax
      raise SystemExit(
          f"will_it_fit: compiling for {topology} needs libtpu (no TPU): install "
          f"\"jax[tpu]=={jax.__version__}\" into a venv of its own, as this script's docstring "
          "shows (README, \"Will it fit\"), or run on a TPU VM.") from None
    with open(out, "a") as f:
      f.write(json.dumps(row) + "\n")


def per_chip(row) -> tuple[str, str]:
  """('12.46 GiB', '79%') of a row, with aot's verdict: a program XLA compiled can still exceed
  what XLA reports as available once its code is counted."""
  from sit_jax import aot
  if "does_not_fit" in row:
    need = row["does_not_fit"].split("XLA needs ")[-1].split(" per device")[0]
    return f"{need}: does not fit", "> 100%"
  total = row["memory"]["total"]
  hbm = aot.TPU_HBM_GIB[row["key"][4].split(":")[0]] * 2**30
  return (f"{total / 2**30:.2f} GiB{': does not fit' if total > hbm else ''}",
          f"{100 * total / hbm:.0f}%")


def read_rows(path: str) -> list[dict]:
  if not os.path.isfile(path):
    raise SystemExit(f"will_it_fit: --markdown={path}: no such file; rows are what --out wrote "
                     "(the README's: benchmarks/will_it_fit*.jsonl).")
  with open(path) as f:
    rows = [json.loads(line) for line in f]
  return list({(tuple(r["key"]), r.get("scan_layers")): r for r in rows}.values())  # last wins


def markdown(path: str) -> str:
  lines = ["| model | global batch | remat | parallelism | slice | per chip | of HBM | "
           "TFLOP per chip: XLA | analytic |",
           "|---|---|---|---|---|---|---|---|---|"]
  table = read_rows(path)
  order = ("S/16", "B/16", "L/16")
  table.sort(key=lambda r: (order.index(r["key"][0]), r["key"][2],
                            PARALLELISMS.index(r["key"][3]), r["key"][4],
                            bool(r.get("scan_layers"))))
  for row in table:
    variant, batch, remat, parallelism, topology = row["key"]
    scan = " (scan)" if row.get("scan_layers") else ""
    memory, share = per_chip(row)
    line = (f"| {variant}{scan} | {batch} | {'on' if remat else 'off'} | {LABELS[parallelism]} | "
            f"{topology} | {memory} | {share} |")
    if "does_not_fit" in row:
      lines.append(line + " | |")
      continue
    loop_undercount = row["loop"] and row["flops"] < row["analytic_flops"]
    lines.append(f"{line} {row['flops'] / 1e12:.2f}{'*' if loop_undercount else ''} | "
                 f"{row['analytic_flops'] / 1e12:.2f} |")
  return "\n".join(lines)


def chips(topology: str) -> int:
  """16 for 'v5e:4x4'."""
  return math.prod(int(d) for d in topology.split(":")[1].split("x"))


def scaling_markdown(path: str) -> str:
  """Parallelisms down, chip counts across: memory per chip (share of HBM)."""
  rows = read_rows(path)
  models = sorted({tuple(r["key"][:3]) for r in rows})
  if len(models) > 1:  # keyed by parallelism and slice alone, their cells would overwrite
    raise SystemExit(f"will_it_fit: {path} holds rows of {len(models)} models "
                     "(variant, batch, remat): --scaling --markdown reads the rows of one (what --scaling wrote, e.g. "
                     "benchmarks/will_it_fit_scaling.jsonl).")
  table = {(r["key"][3], r["key"][4]): r for r in rows}
  slices = sorted({topology for _, topology in table}, key=chips)
  lines = ["| parallelism | " + " | ".join(f"{chips(t)} chips ({t})" for t in slices) + " |",
           "|---|" + "---|" * len(slices)]
  for parallelism in PARALLELISMS:
    cells = [" (".join(per_chip(table[parallelism, t])) + ")" if (parallelism, t) in table
             else "" for t in slices]
    lines.append(f"| {LABELS[parallelism]} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def main(argv):
  del argv
  if FLAGS.parallelism and FLAGS.parallelism not in PARALLELISMS:
    raise SystemExit(f"will_it_fit: --parallelism={FLAGS.parallelism!r}: use one of "
                     f"{', '.join(PARALLELISMS)}.")
  if FLAGS.markdown:
    print((scaling_markdown if FLAGS.scaling else markdown)(FLAGS.markdown))
  else:
    measure(FLAGS.out)


if __name__ == "__main__":
  app.run(main)
