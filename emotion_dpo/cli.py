"""What the top-level scripts share: --config/--set arguments and turning PipelineError into a short message."""

from __future__ import annotations

import errno
import sys

from .errors import PipelineError


def add_config_arguments(parser, default_config: str) -> None:
    parser.add_argument("--config", default=default_config, help=f"JSON config (default: {default_config})")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override one config key, e.g. --set num_prompts=64 or --set dpo.beta=0.2 (repeatable)")


def make_reproducible(seed: int) -> None:
    """The same figures run after run on a CPU: every RNG seeded (random, numpy, torch), one thread (how many threads
    split a float sum sets its last bits) and torch's deterministic algorithms. On a GPU: the seeds only."""
    import torch
    from transformers import set_seed

    if not torch.cuda.is_available():
        torch.set_num_threads(1)
        torch.use_deterministic_algorithms(True)
    set_seed(seed)


RESUME = "run the same command again to resume"


def os_error_message(error: OSError, resume: str = RESUME) -> str:
    """One line for a failed read or write: which file, why, and (the disk full) that finished work is kept."""
    where = f"{error.filename}: " if error.filename else ""
    message = f"{where}{error.strerror or error}"
    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        return (f"{message}. The work finished so far is safe (the journal and checkpoints are written whole and "
                f"fsync'ed before they count); free some space, then {resume}")
    if error.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        return f"{message}: cannot write there; make the folder writable or choose another output_dir"
    return message


def run_main(args, config_class: str, stages, resume: str = RESUME) -> int:
    """Load the config, run `stages(cfg)`; a PipelineError or a failed read or write (full disk, read-only
    folder) is printed as one short message and exits with status 2."""
    from . import config

    try:
        cfg = config.load_config(getattr(config, config_class), args.config, args.set)
        if hasattr(cfg, "seed"):  # run_pipeline's config has none: each stage seeds its own process
            make_reproducible(cfg.seed)
        stages(cfg)
    except PipelineError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    except OSError as error:
        print(f"error: {os_error_message(error, resume)}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print(f"interrupted: finished work is kept; {resume}", file=sys.stderr)
        sys.exit(130)
    return 0
