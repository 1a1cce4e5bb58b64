"""What the top-level scripts share: --config/--set arguments and turning PipelineError into a short message."""

from __future__ import annotations

import errno
import os
import sys

from .errors import PipelineError


CONFIG_KEYS_HELP = ("Config keys: docs/configuration.md lists every key of every script with its type, default "
                    "and help text (generated from emotion_dpo/config.py; in a terminal: python -c \"from "
                    "emotion_dpo.config import GenerateConfig; help(GenerateConfig)\", or TrainConfig, EvaluateConfig, "
                    "PipelineConfig).")


def add_config_arguments(parser, default_config: str) -> None:
    import textwrap

    parser.epilog = "\n\n".join(filter(None, [parser.epilog, textwrap.fill(CONFIG_KEYS_HELP, 100)]))
    parser.add_argument("--config", default=default_config, help=f"JSON config (default: {default_config}; "
                        "its keys: docs/configuration.md)")
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


DISK_FULL_TEXTS = ("No space left on device", "os error 28", "Disk quota exceeded", "os error 122")
# torch.save's writer on a full disk says only "[enforce fail at inline_container.cc] unexpected pos N vs M"
TORCH_WRITE_FAILED = ("inline_container", "PytorchStreamWriter")


def disk_full(error: BaseException, folder: str | None = None) -> bool:
    """Whether `error` (or what caused it) is a full disk, whichever library raised it: an OSError, safetensors'
    SafetensorError ("... No space left on device (os error 28)"), or torch.save's writer with `folder`'s disk
    (nearly) full."""
    import shutil

    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        text = str(error)
        if any(marker in text for marker in DISK_FULL_TEXTS):
            return True
        if folder and any(marker in text for marker in TORCH_WRITE_FAILED):
            try:
                return shutil.disk_usage(folder).free < 64 * 2**20
            except OSError:
                return False
        error = error.__cause__ or error.__context__
    return False


def stop(message: str, code: int = 2):
    """Print `message` on a line of its own and exit: a progress bar the error cut short (the Trainer's, a tqdm
    bar) is closed first, or the message would continue its line."""
    try:
        from tqdm import tqdm

        for bar in list(getattr(tqdm, "_instances", ())):
            bar.close()
    except Exception:  # noqa: BLE001 - the message matters more than the bar
        pass
    print(message, file=sys.stderr, flush=True)
    sys.exit(code)


def record_peak_gpu_memory(script: str) -> None:
    """For run_pipeline --preflight (preflight.PEAK_MEMORY_ENV names the file): this process's peak GPU memory,
    one JSON line appended. Nothing when the variable is unset, torch was never imported or there is no GPU."""
    path = os.environ.get("EMOTION_DPO_PEAK_MEMORY_FILE")
    torch = sys.modules.get("torch")
    if not path or torch is None or not torch.cuda.is_available():
        return
    import json

    try:
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps({"script": os.path.basename(script), "pid": os.getpid(),
                                "peak_gib": torch.cuda.max_memory_allocated() / 2**30}) + "\n")
    except OSError:  # a figure for the preflight's report; the stage's own outcome stands
        pass


def run_main(args, config_class: str, stages, resume: str = RESUME) -> int:
    """Load the config, run `stages(cfg)`; a PipelineError or a failed read or write (full disk, read-only
    folder) is printed as one short message and exits with status 2."""
    from . import config

    cfg = None
    try:
        cfg = config.load_config(getattr(config, config_class), args.config, args.set)
        if hasattr(cfg, "seed"):  # run_pipeline's config has none: each stage seeds its own process
            make_reproducible(cfg.seed)
        stages(cfg)
    except PipelineError as error:
        stop(f"error: {error}")
    except OSError as error:
        stop(f"error: {os_error_message(error, resume)}")
    except Exception as error:  # a library's own error type for a full disk (safetensors, torch.save)
        folder = getattr(cfg, "output_dir", None)
        if not disk_full(error, folder):
            raise
        full = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), folder)
        stop(f"error: {os_error_message(full, resume)} ({type(error).__name__}: {str(error).splitlines()[0][:200]})")
    except KeyboardInterrupt:
        stop(f"interrupted: finished work is kept; {resume}", 130)
    finally:
        record_peak_gpu_memory(sys.argv[0])
    return 0
