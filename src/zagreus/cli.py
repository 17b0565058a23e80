"""The `zagreus` command line: one typer app assembled from each package's `commands` module.

Every verb is a thin module-level function in its package's `commands.py`, whose `register(app)`
adds it (or its verb group); those modules import only typer at module level, so `--help` is
instant. Mistakes the user can fix (UserError) print one line and exit with status 2, no traceback;
so do a full, read-only, forbidden or failing disk (OSError ENOSPC, EROFS, EACCES, EIO).
"""

from __future__ import annotations

import errno
import importlib
import logging
import os
import sys

import typer

from zagreus.errors import UserError

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Train small bilingual language models end to end.")

# In the order `zagreus --help` lists them: the pipeline's stages, then the tools.
COMMAND_MODULES = ("launch", "data", "train", "eval", "post", "release", "serve", "model", "tokenizer")
for package in COMMAND_MODULES:
    importlib.import_module(f"zagreus.{package}.commands").register(app)

# The fix for each disk error a stage can hit in its run directory (checkpoints say where theirs happened).
DISK_ERRORS = {
    errno.ENOSPC: "no space left on device (ENOSPC); free space on that disk or move the run to a larger one, "
                  "then run the same command again",
    errno.EROFS: "read-only file system (EROFS); remount it read-write or choose a writable folder, "
                 "then run the same command again",
    errno.EACCES: "permission denied (EACCES); give this user write access (chown/chmod) or choose another folder",
    errno.EIO: "input/output error (EIO); the disk or network filesystem is failing: check `dmesg`, "
               "copy the run to healthy storage and run it there",
}


def main() -> None:
    # OpenMP threads that spin at barriers collapse on a shared CPU (measured on 2 busy cores: 436
    # instead of ~5,900 tokens/s for the tiny model); sleeping ones do not. torch reads it once, on import.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    try:
        # Without standalone mode click returns the code of a typer.Exit instead of raising it.
        code = app(standalone_mode=False)
    except UserError as exc:
        typer.echo(f"error: {exc}", err=True)
        sys.exit(2)
    except OSError as exc:
        if exc.errno not in DISK_ERRORS:
            raise
        typer.echo(f"error: {f'{exc.filename}: ' if exc.filename else ''}{DISK_ERRORS[exc.errno]}", err=True)
        sys.exit(2)
    except typer.Abort:
        sys.exit(130)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except Exception as exc:
        # Usage errors of click (or of the click that typer vendors) print themselves: no traceback.
        if hasattr(exc, "show") and isinstance(getattr(exc, "exit_code", None), int):
            exc.show()
            sys.exit(exc.exit_code)
        raise
    if isinstance(code, int):
        sys.exit(code)


if __name__ == "__main__":
    main()
