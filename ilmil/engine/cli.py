"""What the training tools share: their run flags, the config those flags set, and
the entry point, where a mistake in the user's input ends in one ``error: ...`` line
on stderr and exit status 1, not a traceback."""
import argparse
import sys

from detectron2.utils import comm
from detectron2.utils.logger import setup_logger

from ..config import (ConfigError, check_device, class_names_flag, config_file_method, config_overrides, derived_cfg,
                      get_ilmil_cfg)
from .launch import init_distributed
from .run_dir import require_output_dir
from .runner import RUN_ERRORS

__all__ = ["add_run_arguments", "run_tool_main", "setup_run", "tool_parser"]


class ToolArgumentParser(argparse.ArgumentParser):
    """argparse's parser whose refusals (an unknown flag, a missing value, a tool's own
    ``parser.error``) are the tools' one ``error: ...`` line and exit status 1, where
    argparse prints its usage first and exits with 2."""

    def error(self, message):
        self.exit(1, f"error: {message}; fix: see {self.prog} --help\n")


def tool_parser(description):
    """A tool's parser: its module docstring as the help text, laid out as written."""
    return ToolArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)


def add_run_arguments(parser, stages_help):
    """The flags of every training tool: config, data, schedule, run folder, seed."""
    parser.add_argument("--config-file", default="", help="yaml config (default: the shapes CPU config)")
    parser.add_argument("--dataset", help="shapes | voc_2007 | voc_2012 | voc_07_12 | coco_2017 | voc_folder | coco_json")
    parser.add_argument("--stages", help=stages_help)
    parser.add_argument("--class-order", help="comma-separated class names (default: the dataset's order)")
    # Checked by setup_run, not argparse: given after the KEY VALUE overrides it is read as one of
    # them, and the overrides' check says so, where argparse would only call it missing.
    parser.add_argument("--output-dir", help="run folder (required); a re-run reuses what is finished")
    parser.add_argument("--resume", action="store_true",
                        help="continue the stage in progress from its last checkpoint (after a crash or a kill)")
    parser.add_argument("--force", action="store_true",
                        help="start over in a folder that holds another run (removes that run's outputs)")
    parser.add_argument("--seed", type=int, help="training seed (default: the config's SEED)")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE config overrides")


def setup_run(args, method=None, required=(), tool_flags=None):
    """The run's frozen config from the flags of ``add_run_arguments`` (then
    ``tool_flags``: the tool's own, flag -> (config key, value), None = not given), the
    output folder checked, the process group joined under torchrun and the loggers set
    up. ``required``: the tool's own flags it cannot run without, besides ``--output-dir``.
    detectron2's own setup (which writes OUT/config.yaml) is left to the tool, after the
    run has passed its checks."""
    cfg = get_ilmil_cfg(args.config_file or None, args.opts, method=method)
    named = config_file_method(args.config_file) if method and args.config_file else None
    if named and named != method:
        # A run's config.yaml holds every key of its method's preset: they would override this method's.
        raise ConfigError(f"--config-file {args.config_file} is a config of method {named} (its ILMIL.METHOD), whose "
                          f"keys would override those of {method}; fix: give the config that run was made from (its "
                          f"--config-file), or train as {named}")
    missing = [flag for flag in ("--output-dir", *required) if getattr(args, flag[2:].replace("-", "_")) is None]
    if missing:
        raise ConfigError(f"{', '.join(missing)} not given; fix: add {' '.join(f'{flag} ...' for flag in missing)} "
                          "before any KEY VALUE override (see --help)")
    if args.resume and args.force:
        raise ConfigError("--resume and --force together: --resume continues the run in --output-dir, --force "
                          "removes its outputs and starts over; fix: give one of them")
    class_order = class_names_flag("--class-order", args.class_order) if args.class_order else None
    flags = {"--dataset": ("ILMIL.DATASET", args.dataset), "--stages": ("ILMIL.STAGES", args.stages),
             "--seed": ("SEED", args.seed), "--class-order": ("ILMIL.CLASS_ORDER", class_order),
             "--output-dir": ("OUTPUT_DIR", args.output_dir), **(tool_flags or {})}
    overridden = set(config_overrides(args.opts)[::2])  # KEY VALUE pairs (get_ilmil_cfg has checked their form)
    both = [f"{flag} and {key}" for flag, (key, value) in flags.items() if value is not None and key in overridden]
    if both:
        raise ConfigError(f"{', '.join(both)} both given (the flag would win); fix: give one of them")
    cfg = derived_cfg(cfg, {key: value for key, value in flags.values() if value is not None})
    cfg.freeze()
    require_output_dir(cfg.OUTPUT_DIR)
    check_device(cfg)  # before the process group joins on it
    init_distributed(cfg.MODEL.DEVICE)
    setup_logger(cfg.OUTPUT_DIR, distributed_rank=comm.get_rank(), name="ilmil", abbrev_name="ilmil")
    return cfg


def run_tool_main(main, argv=None):
    """``main(argv)``'s exit status; an error of ``RUN_ERRORS`` (its message names what
    was wrong, where, and the fix) is printed as ``error: <message>`` and gives 1, a
    Ctrl-C one line and 130 (the shell's status of an interrupted command)."""
    try:
        return main(argv)
    except RUN_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # Ctrl-C: checkpoints are written whole (atomic_write), so nothing is lost
        print("error: interrupted; what was saved is kept: a training continues from its last checkpoint with "
              "the same command and --resume", file=sys.stderr)
        return 130
