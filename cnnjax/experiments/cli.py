"""The command line behind `python -m experiments.run`.

    python -m experiments.run                       # the default experiment (quickstart)
    python -m experiments.run --list                # every experiment, one line each
    python -m experiments.run --config experiments/configs/degradation.py:smoke \\
        --config.train.num_epochs=2 --workdir runs/try
    python -m experiments.run --config experiments/configs/efficientnet_scaling.py --trial 3
    python -m experiments.run --config experiments/configs/degradation.py \\
        --publish experiments/results/degradation    # copies the finished results, with provenance
    python -m experiments.run --config experiments/configs/degradation.py \\
        --merge_from /other/machine/runs/degradation # its finished trials, then the rest here

Configs are locked `ml_collections` ConfigDicts: `--config.<key>=<value>`
overrides any field, and a key that does not exist is an error that names it.
This module sets JAX's persistent compilation cache: it is an entry point.
"""

from __future__ import annotations

import ast
import importlib.util
import os
import pathlib
import shlex
import sys
import traceback

from absl import flags

CONFIG_DIR = pathlib.Path(__file__).resolve().parents[2] / "experiments" / "configs"
DEFAULT_EXPERIMENT = "quickstart"


def experiment_files() -> dict[str, pathlib.Path]:
  return {p.stem: p for p in sorted(CONFIG_DIR.glob("*.py")) if not p.stem.startswith("_")}


def _first_docstring_line(path: pathlib.Path) -> str:
  spec = importlib.util.spec_from_file_location(f"_cnnjax_config_{path.stem}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return (module.__doc__ or "").strip().splitlines()[0]


def list_experiments() -> str:
  lines = []
  for name, path in experiment_files().items():
    marker = " (default)" if name == DEFAULT_EXPERIMENT else ""
    lines.append(f"{name:22s}{_first_docstring_line(path)}{marker}")
  return "\n".join(lines)


def _define_flags(argv: list[str]) -> flags.FlagValues:
  from ml_collections import config_flags  # noqa: PLC0415

  values = flags.FlagValues()
  config_flags.DEFINE_config_file(
      "config", str(CONFIG_DIR / f"{DEFAULT_EXPERIMENT}.py"),
      "experiment config: experiments/configs/<name>.py[:variant]", flag_values=values,
      lock_config=True, sys_argv=argv)  # the override flags come from argv, not sys.argv
  flags.DEFINE_string("workdir", None, "where the run lives (default runs/<experiment>[-variant])",
                      flag_values=values)
  flags.DEFINE_bool("list", False, "list the experiments and exit", flag_values=values)
  flags.DEFINE_integer("trial", None, "run only this trial of a sweep", flag_values=values)
  flags.DEFINE_string("cache_dir", os.path.expanduser("~/.cache/cnnjax/jax-cache"),
                      "JAX persistent compilation cache ('' disables it)", flag_values=values)
  flags.DEFINE_enum("launcher", "local", ["local", "ray"], "who runs a sweep's trials: this "
                    "process in order, or a Ray cluster at once (config.trial_resources each)",
                    flag_values=values)
  flags.DEFINE_string("ray_address", None, "with --launcher=ray: 'auto' (the cluster this "
                      "machine joined), host:port, or unset for a Ray started here",
                      flag_values=values)
  flags.DEFINE_bool("verbose", False, "on an error, also print its traceback",
                    flag_values=values)
  flags.DEFINE_string("publish", None, "after the run, copy its report, tables and plots here "
                      "with the date, machine and command (never overwrites)", flag_values=values)
  flags.DEFINE_string("merge_from", None, "before the run, copy the finished trials of this "
                      "sweep workdir (their records, not checkpoints) into --workdir where it has "
                      "none; nothing is overwritten", flag_values=values)
  values(argv)
  return values


def _config_argument(argv: list[str]) -> str:
  for i, arg in enumerate(argv):
    if arg.startswith("--config="):
      return arg.split("=", 1)[1]
    if arg == "--config" and i + 1 < len(argv):
      return argv[i + 1]
  return str(CONFIG_DIR / f"{DEFAULT_EXPERIMENT}.py")


def describe_error(error: BaseException) -> str:
  """One readable line: a KeyError's own text (not its repr), the lines of a message joined.

  absl wraps a config-key typo's KeyError in a flag error whose text is that KeyError's
  repr (quotes and escaped newlines); it is unwrapped too.
  """
  if isinstance(error, KeyError) and error.args and isinstance(error.args[0], str):
    text = error.args[0]
  else:
    text = str(error)
  while len(text) > 1 and text[0] == text[-1] and text[0] in "'\"":
    try:
      literal = ast.literal_eval(text)
    except (ValueError, SyntaxError):
      break
    if not isinstance(literal, str):
      break
    text = literal
  return "; ".join(line.strip() for line in text.splitlines() if line.strip()) or repr(error)


def _user_errors() -> tuple[type[BaseException], ...]:
  """What a user's config, data, workdir or training can raise: an error line, not a traceback."""
  from cnnjax import lease  # noqa: PLC0415
  from cnnjax.train.checkpoint import DiskFullError  # noqa: PLC0415
  from cnnjax.train.loop import NonFiniteLossError  # noqa: PLC0415

  return (DiskFullError, flags.Error, KeyError, AttributeError, ValueError, FileNotFoundError,
          NotADirectoryError, PermissionError, lease.WorkdirBusyError, lease.WorkdirLeaseLost,
          NonFiniteLossError)


def _merge(source: pathlib.Path, workdir: pathlib.Path) -> None:
  from cnnjax.experiments import sweep  # noqa: PLC0415

  merged = sweep.merge_finished(source, workdir)
  print(f"merged from {source}: {len(merged.copied)} finished trials copied, "
        f"{len(merged.kept)} already finished here", flush=True)
  if merged.unfinished_here:
    print(f"  kept this workdir's own unfinished attempts at {', '.join(merged.unfinished_here)}; "
          f"remove a trial's directory here to take {source}'s finished record instead",
          flush=True)


def main(argv: list[str] | None = None) -> int:
  """The command line; every error a user can cause ends in one `error:` line (exit 1 or 2).

  Exit 1: the run itself failed (a NaN loss, a failed trial, a full disk); 2: bad settings,
  data or workdir, and nothing was written over; 75: preempted by a signal after saving
  (`cnnjax.train.preemption`), to be rerun as it was. `--verbose` also prints the traceback.
  """
  argv = list(sys.argv if argv is None else ["experiments.run", *argv])
  try:
    return _main(argv)
  except _user_errors() as error:
    from cnnjax.train.checkpoint import DiskFullError  # noqa: PLC0415
    from cnnjax.train.loop import NonFiniteLossError  # noqa: PLC0415

    if "--verbose" in argv[1:]:
      traceback.print_exc()
    # absl's flag errors say what they are; for the others the type names the problem
    # (ConfigMismatchError, WorkdirBusyError, DatasetError, ...).
    kind = "" if isinstance(error, flags.Error) else f"{type(error).__name__}: "
    print(f"error: {kind}{describe_error(error)}", file=sys.stderr)
    return 1 if isinstance(error, (NonFiniteLossError, DiskFullError)) else 2


def _main(argv: list[str]) -> int:
  if "--list" in argv[1:]:
    print(list_experiments())
    return 0
  values = _define_flags(argv)
  config = values.config
  if values.cache_dir:
    import jax  # noqa: PLC0415

    jax.config.update("jax_compilation_cache_dir", values.cache_dir)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
  import logging  # noqa: PLC0415

  logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
  from cnnjax.experiments import kinds  # noqa: PLC0415

  config_path = _config_argument(argv)
  variant = config_path.split(":", 1)[1] if ":" in config_path else None
  name = config.name + (f"-{variant}" if variant and variant != "full" else "")
  workdir = pathlib.Path(values.workdir or pathlib.Path("runs") / name).absolute()
  command = "python -m experiments.run " + " ".join(shlex.quote(a) for a in argv[1:])
  if values.publish is not None and not values.publish.strip():
    print("error: --publish needs a directory, e.g. --publish experiments/results/<name>",
          file=sys.stderr)
    return 2
  if values.merge_from is not None and not values.merge_from.strip():
    print("error: --merge_from needs a sweep's workdir, e.g. --merge_from runs/<name>",
          file=sys.stderr)
    return 2
  print(f"experiment {config.name}{f' ({variant})' if variant else ''}: {config.description}")
  print(f"workdir {workdir}")
  from cnnjax import host_allocator  # noqa: PLC0415

  print(f"host allocator: {host_allocator.state()}", flush=True)
  host_allocator.warn_if_too_late()
  if values.merge_from:
    _merge(pathlib.Path(values.merge_from), workdir)
  from cnnjax.experiments import launch  # noqa: PLC0415

  launcher = None
  if values.launcher != "local" and values.trial is None:
    launcher = launch.make(values.launcher, config.get("trial_resources", "CPU=1"),
                           values.ray_address)
    print(f"launcher {values.launcher}: {launcher.resources} per trial", flush=True)
  from cnnjax.train import preemption  # noqa: PLC0415

  # A preemption signal ends a trial after a synchronous save and starts no new one: the
  # process exits with preemption.EXIT_CODE, and the same command resumes.
  signals = config.train.save_on_signals if "train" in config else preemption.SIGNALS
  with preemption.watch(signals):
    outcome = kinds.run(config, workdir, values.trial, command.strip(), launcher)
  rows = outcome["rows"]
  if values.trial is not None and not any(r.get("trial") == values.trial for r in rows):
    print(f"error: --trial {values.trial} does not exist; this experiment has trials "
          f"0..{len(rows) - 1}", file=sys.stderr)
    return 2
  failed = [r for r in rows if r.get("status") == "failed"]
  finished = [r for r in rows if r.get("accuracy") is not None]
  if len(rows) == 1 and finished:
    print(f"final test accuracy: {100 * finished[0]['accuracy']:.2f}% "
          f"({int(finished[0]['eval_examples'])} test images)")
  else:
    print(f"{len(finished)} of {len(rows)} trials finished"
          + (f", {len(failed)} failed" if failed else ""))
    for row in finished:
      print(f"  {row['name']}: {100 * row['accuracy']:.2f}%")
  print(f"results: {workdir / 'results.csv'}, report: {outcome['report']}")
  if values.publish is not None:
    from cnnjax.experiments import reports  # noqa: PLC0415

    if failed or values.trial is not None:
      print("error: not published: only a whole experiment with no failed trial is published",
            file=sys.stderr)
      return 2
    try:
      published = reports.publish(workdir, pathlib.Path(values.publish), command.strip())
    except reports.PublishError as error:
      print(f"error: {error}", file=sys.stderr)
      return 2
    print(f"published: {published}")
  return 1 if failed else 0
