"""The ``cute-moe`` command: precompile, cache ls|verify|clear, tune, bench, bench-fp4."""

import argparse
import sys
from pathlib import Path
from typing import Optional

import cute_moe
from cute_moe import cache
from cute_moe.dispatch import format_config
from cute_moe.arch import get_backend
from cute_moe.specs import GemmSpec

from . import (bench, bench_fp4, bench_fp8_backward, bench_gathered_swiglu, bench_gathered_swiglu_backward,
               bench_mega_moe, bench_moe_layer, bench_training, precompile, tune)
from .command import OneLineParser, add_debug_flag, call_handler


def _root(args: argparse.Namespace) -> Path:
    return Path(args.cache_dir).expanduser() if args.cache_dir else cache.cache_root()


def cache_ls(args: argparse.Namespace) -> int:
    """List this build's entries and count stale objects; 2 when the cache directory is unusable."""
    try:
        directory = cache.open_build_dir(_root(args))
        entries, stale = cache.list_entries(directory.path.parent)
    except cache.CacheDirError as e:
        print(f"cute-moe cache ls: {e}", file=sys.stderr)
        return 2
    parts = cache.fingerprint_parts()
    print(f"cache {directory.path}{'' if directory.writable else ' (read-only)'} (nvidia-cutlass-dsl "
          f"{parts['nvidia-cutlass-dsl']}, apache-tvm-ffi {parts['apache-tvm-ffi']}, {parts['host']})")
    total = 0
    for meta in entries:
        try:
            key = meta["key"]
            spec = GemmSpec.from_dict(key["spec"])
            config = get_backend(spec.arch).config_type(**key["config"])
            total += meta["size"]
            print(f"  {meta['digest'][:12]}  {key['kernel']}  {precompile.describe_spec(spec)}  "
                  f"{format_config(config, spec.arch)}  {spec.arch}  {precompile.format_size(meta['size'])}  "
                  f"compiled in {meta['compile_seconds']:.2f} s  {meta['created']}")
        except (KeyError, TypeError, ValueError):
            print(f"  {meta['digest'][:12]}  (unreadable manifest entry: run `cute-moe cache verify`)")
    print(f"{len(entries)} entries, {precompile.format_size(total)}")
    for name, count in stale.items():
        what = "entries of changed kernel sources" if name == directory.path.name else f"objects of build {name}"
        print(f"stale: {count} {what} (`cute-moe cache clear --stale` removes them)")
    return 0


def cache_verify(args: argparse.Namespace) -> int:
    """Check and load every entry; 1 when something was removed, reported or skipped, 2 when the
    cache directory is unusable."""
    try:
        good, problems = cache.verify(_root(args))
    except cache.CacheDirError as e:
        print(f"cute-moe cache verify: {e}", file=sys.stderr)
        return 2
    for name, reason in problems:
        print(f"  {name}: {reason}")
    print(f"{good} good entries, {len(problems)} problems")
    return 1 if problems else 0


def cache_clear(args: argparse.Namespace) -> int:
    """Delete cached objects (all builds', or only stale ones); 2 when the directory is unusable."""
    root = _root(args)
    try:
        removed = cache.clear(root, stale_only=args.stale)
    except cache.CacheDirError as e:
        print(f"cute-moe cache clear: {e}", file=sys.stderr)
        return 2
    print(f"removed {removed} objects{' (stale only)' if args.stale else ''} under {root}")
    return 0


# Subcommands served by a tool module's ``add_arguments`` / ``run`` (its docstring's first line is the
# description): (name, module, help), in the order of the help text, ``cache`` after ``precompile``.
PRECOMPILE_COMMAND = ("precompile", precompile, "compile a model's specializations into the disk cache (no GPU)")
TOOL_COMMANDS = (
    ("tune", tune, "measure candidate configs on the GPU, write a tuned table"),
    ("bench", bench, "benchmark the GEMMs against torch on the GPU"),
    ("bench-fp4", bench_fp4, "benchmark the MXFP4-weight GEMMs against our FP8/BF16 and torch"),
    ("bench-training", bench_training, "benchmark the backward GEMMs against torch._grouped_mm"),
    ("bench-fp8-backward", bench_fp8_backward,
     "benchmark the FP8 backward GEMMs against torch, our BF16 and K-major FP8 ones"),
    ("bench-layer", bench_moe_layer, "benchmark the MoE training layer against the torch._grouped_mm reference layer"),
    ("bench-gemm1", bench_gathered_swiglu,
     "benchmark the MoE layer's fused GEMM1 (gather + SwiGLU) against unfused GEMM1s"),
    ("bench-dact", bench_gathered_swiglu_backward, "benchmark the MoE layer's fused backward dact GEMM (gather + "
     "SwiGLU backward + d weight) against the unfused sequence"),
    ("bench-mega-moe", bench_mega_moe, "benchmark Mega MoE (one kernel per GPU) against the unfused and NCCL "
     "expert-parallel pipelines"),
)


def _add_tool_command(commands, name: str, module, text: str) -> None:
    sub = commands.add_parser(name, help=text, description=module.__doc__.splitlines()[0])
    module.add_arguments(sub)
    sub.set_defaults(handler=module.run)


def _add_cache_command(commands) -> None:
    sub = commands.add_parser("cache", help="inspect or clean the disk cache")
    actions = sub.add_subparsers(dest="action", required=True, metavar="ACTION")
    for name, handler, text in (("ls", cache_ls, "list this build's entries"),
                                ("verify", cache_verify, "check and load every entry, remove unusable ones "
                                 "(only report them in a read-only cache)"),
                                ("clear", cache_clear, "delete cached objects")):
        action = actions.add_parser(name, help=text, description=text)
        action.add_argument("--cache-dir", help="cache root (default: CUTE_MOE_CACHE_DIR or the user cache dir)")
        action.set_defaults(handler=handler)
        if name == "clear":
            action.add_argument("--stale", action="store_true",
                                help="only stale objects: other builds' and those of changed kernel sources")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="cute-moe", description="cute-moe MoE GEMM kernels: build tools")
    parser.add_argument("--version", action="version", version=f"cute-moe {cute_moe.__version__}")
    add_debug_flag(parser)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_tool_command(commands, *PRECOMPILE_COMMAND)
    _add_cache_command(commands)
    for command in TOOL_COMMANDS:
        _add_tool_command(commands, *command)
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    """``cute-moe``: run one command; errors end as one line (see call_handler)."""
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    return call_handler(f"cute-moe {args.command}", args.handler, args)


if __name__ == "__main__":
    sys.exit(main())
