"""What every command line of the package shares: one-line errors, the GPU check, the module entry point.

``cute-moe`` (tools/cli.py) and ``python -m cute_moe.tools.<command>`` both end here, so an error is
one line naming the option or path, with exit 2 for bad arguments and 1 for anything else (a missing
GPU included); a traceback only with ``--debug`` or CUTE_MOE_DEBUG=1.
"""

import argparse
import os
import re
import sys
from typing import Callable, NoReturn, Optional

import torch

from cute_moe.launcher import DEBUG_ENV

Handler = Callable[[argparse.Namespace], int]


class NoGpuError(RuntimeError):
    """No CUDA GPU is visible (reported in one line, exit 1)."""


def require_gpu(what: str) -> None:
    """Raise NoGpuError unless torch sees a CUDA GPU; ``what`` names the work that needs one."""
    if not torch.cuda.is_available():
        reason = "was built without CUDA" if torch.version.cuda is None else "sees no CUDA device"
        raise NoGpuError(f"{what} needs a GPU, none is visible (torch {torch.__version__} {reason})")


class OneLineParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line, ``PROG: error: MESSAGE; see PROG --help`` (exit 2)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}; see {self.prog} --help\n")


def make_out_dir(path: str) -> None:
    """Create a benchmark's ``--out`` folder; a folder that cannot be made is a one-line error."""
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise ValueError(f"--out: cannot create {path}: {e.strerror or e}") from None


def one_line(text: str) -> str:
    """``text`` without terminal colours, its whitespace runs (newlines included) as single spaces."""
    return " ".join(re.sub(r"\x1b\[[0-9;]*m", "", text).split())


def call_handler(prog: str, handler: Handler, args: argparse.Namespace) -> int:
    """``handler(args)``, its errors reported as one line ``PROG: error: ...`` on stderr: ValueError (bad
    arguments) exits 2, a missing GPU or any other exception 1, Ctrl-C 130. With ``args.debug`` or
    CUTE_MOE_DEBUG set (as cute_moe.launcher reads it: not empty, not 0) exceptions propagate (traceback)."""
    try:
        return handler(args)
    except (Exception, KeyboardInterrupt) as e:  # noqa: BLE001 - the last resort: one line, not a traceback
        if args.debug or os.environ.get(DEBUG_ENV, "0") not in ("", "0"):
            raise
        if isinstance(e, KeyboardInterrupt):
            print(f"{prog}: interrupted", file=sys.stderr)
            raise SystemExit(130) from None
        if isinstance(e, (ValueError, NoGpuError)):
            message = str(e)
        else:
            message = f"{type(e).__name__}: {e} (--debug or {DEBUG_ENV}=1 shows the traceback)"
        print(f"{prog}: error: {one_line(message)}", file=sys.stderr)
        raise SystemExit(2 if isinstance(e, ValueError) else 1) from None


def add_debug_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--debug", action="store_true",
                        help=f"show the traceback of an unexpected error ({DEBUG_ENV}=1 does too, and also turns "
                        "on the host-side index checks before each launch)")


def module_main(name: str, doc: str, add_arguments: Callable[[argparse.ArgumentParser], None], run: Handler,
                argv: Optional[list[str]] = None) -> int:
    """``python -m cute_moe.tools.NAME``: the same parser and error handling as ``cute-moe NAME``."""
    parser = OneLineParser(prog=f"cute-moe {name}", description=doc.splitlines()[0])
    add_debug_flag(parser)
    add_arguments(parser)
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    return call_handler(parser.prog, run, args)
