"""The README's "will it fit" table: the SiT step compiled for TPU slices with --aot_topology.

  pip install "jax[tpu]==$(python -c 'import jax; print(jax.__version__)')"   # README: libtpu
  python benchmarks/will_it_fit.py --out=/tmp/will_it_fit.jsonl
  python benchmarks/will_it_fit.py --only=B/16 --generation=v5e --out=...   # some rows

Every row is one `sit_jax.aot.run` (what `python -m sit_jax.main --aot_topology=...` prints) of
configs/sit_vitb.py with the variant, batch, remat and parallelism of the row: data-parallel
(the default: mesh.data=-1, parameters replicated) or FSDP (configs/sit_vitb.py:fsdp). Rows are
appended to --out as JSON lines as they finish (each compile takes minutes on a small host) and
rows already there are skipped; a row XLA refuses records its one-line reason. --markdown
prints the table of a file.
"""
from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("out", "/tmp/will_it_fit.jsonl", "JSON lines, appended.")
flags.DEFINE_string("only", "", "Only this variant, e.g. 'B/16'.")
flags.DEFINE_string("generation", "", "Only the slices of this TPU generation, e.g. 'v5e'.")
flags.DEFINE_string("parallelism", "", "Only 'data' or 'fsdp' rows.")
flags.DEFINE_string("compiler_options", None, "config.compiler_options of every row instead of "
                    "the recipe's (FSDP: libtpu's windowed einsums off), e.g. '' for XLA's "
                    "defaults; recorded in the row.")
flags.DEFINE_string("markdown", "", "Print the table of this JSON-lines file and exit.")
flags.DEFINE_bool("scan_layers", False, "Compile one scanned block (model.scan_layers): about a "
                  "minute per row instead of 2-4 on a 2-core host; XLA then counts the blocks' "
                  "FLOPs once.")

# (variant, global batch, slices): every slice of a model has the same number of chips.
MODELS = (("B/16", 1024, ("v5e:4x4", "v4:2x2x4")),
          ("L/16", 1024, ("v5e:4x4", "v4:2x2x4")),
          ("S/16", 256, ("v5e:2x2", "v4:2x2x1")))


def rows(generation: str = ""):
  """(variant, batch, remat, parallelism, topology): first the rows one would run (remat for
  ViT-L only), then the others."""
  rows = [(variant, batch, remat, parallelism, topology)
          for variant, batch, slices in MODELS for remat in (False, True)
          for parallelism in ("fsdp", "data") for topology in slices
          if (not generation or topology.startswith(generation + ":"))
          and (not FLAGS.only or variant == FLAGS.only)
          and (not FLAGS.parallelism or parallelism == FLAGS.parallelism)]
  return sorted(rows, key=lambda r: r[2] != (r[0] == "L/16"))


def config_for(variant: str, batch: int, remat: bool, parallelism: str):
  """configs/sit_vitb.py[:fsdp] --config.model.variant=... --config.data.global_batch_size=...
  --config.model.remat=... [--config.model.scan_layers=True]"""
  from configs import sit_vitb
  c = sit_vitb.get_config("fsdp" if parallelism == "fsdp" else None)
  c.model.variant = variant
  c.data.global_batch_size = batch
  c.model.remat = remat
  c.model.scan_layers = FLAGS.scan_layers
  if FLAGS.compiler_options is not None:
    c.compiler_options = FLAGS.compiler_options
  return c


def measure(out: str):
  from sit_jax import aot
  done = set()
  if os.path.exists(out):
    with open(out) as f:
      done = {tuple(json.loads(line)["key"]) for line in f}
  for key in rows(FLAGS.generation):
    if key in done:
      continue
    variant, batch, remat, parallelism, topology = key
    config = config_for(variant, batch, remat, parallelism)
    row = {"key": key, "scan_layers": FLAGS.scan_layers,
           "compiler_options": config.compiler_options}
    try:
      figures = aot.run(config, topology)
      row.update(memory=figures["memory_bytes"], flops=figures["flops"],
                 analytic_flops=figures["analytic_flops"], loop=figures["loop"])
    except aot.DoesNotFit as e:
      print(e, flush=True)
      row["does_not_fit"] = str(e)
    with open(out, "a") as f:
      f.write(json.dumps(row) + "\n")


def markdown(path: str) -> str:
  from sit_jax import aot
  lines = ["| model | global batch | remat | parallelism | slice | per chip | of HBM | "
           "TFLOP per chip: XLA | analytic |",
           "|---|---|---|---|---|---|---|---|---|"]
  with open(path) as f:
    rows = [json.loads(line) for line in f]
  table = list({(tuple(r["key"]), r.get("scan_layers")): r for r in rows}.values())  # last wins
  order = ("S/16", "B/16", "L/16")
  table.sort(key=lambda r: (order.index(r["key"][0]), r["key"][2], r["key"][3] != "data",
                            r["key"][4], bool(r.get("scan_layers"))))
  for row in table:
    variant, batch, remat, parallelism, topology = row["key"]
    scan = " (scan)" if row.get("scan_layers") else ""
    head = (f"| {variant}{scan} | {batch} | {'on' if remat else 'off'} | "
            f"{'FSDP' if parallelism == 'fsdp' else 'data'} | {topology} |")
    if "does_not_fit" in row:
      need = row["does_not_fit"].split("XLA needs ")[-1].split(" per device")[0]
      lines.append(f"{head} {need}: does not fit | > 100% | | |")
      continue
    total, hbm = row["memory"]["total"], aot.TPU_HBM_GIB[topology.split(":")[0]] * 2**30
    over = ": does not fit" if total > hbm else ""  # aot's verdict: XLA compiled it, but the
    # program with its code exceeds what XLA reports as available.
    lines.append(f"{head} {total / 2**30:.2f} GiB{over} | {100 * total / hbm:.0f}% | "
                 f"{row['flops'] / 1e12:.2f}"
                 f"{'*' if row['loop'] and row['flops'] < row['analytic_flops'] else ''} | "
                 f"{row['analytic_flops'] / 1e12:.2f} |")
  return "\n".join(lines)


def main(argv):
  del argv
  if FLAGS.markdown:
    print(markdown(FLAGS.markdown))
  else:
    measure(FLAGS.out)


if __name__ == "__main__":
  app.run(main)
