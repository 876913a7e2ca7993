"""Where metrics go: a JSONL file, TensorBoard event files, progress, the logger.

Progress is a bar on a terminal; elsewhere (a log file, CI, a cluster job) a
plain line every `PLAIN_PROGRESS_LINES`-th of the run, so logs hold no
carriage-return frames.

Only process 0 writes; on other processes every method is a no-op. Records in
`metrics.jsonl` are `{"step", "split", ...metrics}`; a resumed run appends a
`{"event": "resume", "step"}` line, after which records for a step replace the
earlier ones (see `read_metrics`); a run stopped by a preemption signal first
writes `{"event": "preempted", "step", "signal"}`.
"""

from __future__ import annotations

import json
import logging
import math
import pathlib
import sys
import time

import jax

log = logging.getLogger("cnnjax.train")
PLAIN_PROGRESS_LINES = 20


class MetricWriter:
  def __init__(self, workdir: pathlib.Path, total_steps: int, images_per_step: int,
               start_step: int = 0, tensorboard: bool = True, progress_bar: bool = True):
    self.active = jax.process_index() == 0
    self.total_steps = total_steps
    self.images_per_step = images_per_step
    self._last_time = time.perf_counter()
    self._last_step = start_step
    self._jsonl = None
    self._tensorboard = None
    self._bar = None
    self._plain_every = 0  # steps between plain progress lines (0: none)
    self._plain_last = start_step
    if not self.active:
      return
    workdir.mkdir(parents=True, exist_ok=True)
    self._jsonl = open(workdir / "metrics.jsonl", "a", encoding="utf-8")  # noqa: SIM115
    if start_step:
      self._write_line({"event": "resume", "step": start_step})
    if tensorboard:
      try:
        from tensorboardX import SummaryWriter  # noqa: PLC0415
      except ImportError:
        log.warning("tensorboardX is not installed: no TensorBoard event files "
                    "(pip install tensorboardX)")
      else:
        self._tensorboard = SummaryWriter(str(workdir / "tensorboard"))
    if progress_bar and _on_terminal():
      from tqdm.auto import tqdm  # noqa: PLC0415

      self._bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True,
                       desc="train")
    elif progress_bar:
      self._plain_every = max(1, math.ceil(total_steps / PLAIN_PROGRESS_LINES))

  def _write_line(self, record: dict) -> None:
    self._jsonl.write(json.dumps(record) + "\n")
    self._jsonl.flush()

  def event(self, name: str, step: int, **details) -> None:
    if self.active:
      self._write_line({"event": name, "step": step, **details})

  def write(self, step: int, split: str, metrics: dict) -> None:
    if not self.active:
      return
    values = {k: float(v) for k, v in metrics.items()}
    self._write_line({"step": step, "split": split, **values})
    if self._tensorboard is not None:
      for key, value in values.items():
        if math.isfinite(value):
          self._tensorboard.add_scalar(f"{split}/{key}", value, step)
      self._tensorboard.flush()
    log.info("step %d %s: %s", step, split, " ".join(f"{k}={v:.4g}" for k, v in values.items()))

  def train_progress(self, step: int, metrics: dict) -> dict:
    """Adds throughput to `metrics` and advances the bar; returns the metrics."""
    now = time.perf_counter()
    steps = step - self._last_step
    metrics = dict(metrics)
    if steps > 0 and now > self._last_time:
      metrics["images_per_second"] = steps * self.images_per_step / (now - self._last_time)
    self._last_time, self._last_step = now, step
    if self._bar is not None:
      self._bar.update(step - self._bar.n)
      postfix = {"loss": f"{float(metrics['loss']):.4f}"}
      if "images_per_second" in metrics:
        postfix["img/s"] = f"{metrics['images_per_second']:.0f}"
      self._bar.set_postfix(postfix, refresh=True)
    elif self._plain_every and (step - self._plain_last >= self._plain_every
                                or step >= self.total_steps):
      self._plain_last = step
      rate = (f", {metrics['images_per_second']:.0f} img/s" if "images_per_second" in metrics
              else "")
      print(f"train step {step}/{self.total_steps} ({100 * step / self.total_steps:.0f}%): "
            f"loss {float(metrics['loss']):.4f}{rate}", flush=True)
    return metrics

  def reset_timer(self, step: int) -> None:
    """Excludes evaluation and checkpointing from the throughput."""
    self._last_time, self._last_step = time.perf_counter(), step

  def close(self) -> None:
    if self._bar is not None:
      self._bar.close()
    if self._tensorboard is not None:
      self._tensorboard.close()
    if self._jsonl is not None:
      self._jsonl.close()


def _on_terminal() -> bool:
  return hasattr(sys.stderr, "isatty") and sys.stderr.isatty()


def read_metrics(path: pathlib.Path) -> list[dict]:
  """The records of `metrics.jsonl`, later records for a (split, step) replacing earlier ones."""
  latest: dict = {}
  with open(path, encoding="utf-8") as handle:
    for line in handle:
      record = json.loads(line)
      if "split" in record:
        latest[(record["split"], record["step"])] = record
  return sorted(latest.values(), key=lambda r: (r["step"], r["split"]))
