"""The ``cute-moe`` command: precompile, cache ls|verify|clear, tune, bench."""

import argparse
import sys
from pathlib import Path
from typing import Optional

from cute_moe import cache
from cute_moe.dispatch import format_config
from cute_moe.specs import GemmSpec, KernelConfig

from . import precompile, tune


def _root(args: argparse.Namespace) -> Path:
    return Path(args.cache_dir).expanduser() if args.cache_dir else cache.cache_root()


def cache_ls(args: argparse.Namespace) -> int:
    """List this build's entries and count other builds' objects."""
    root = _root(args)
    entries, stale = cache.list_entries(root)
    parts = cache.fingerprint_parts()
    print(f"cache {root / cache.fingerprint()} (nvidia-cutlass-dsl {parts['nvidia-cutlass-dsl']}, "
          f"apache-tvm-ffi {parts['apache-tvm-ffi']}, {parts['host']}, sources {parts['sources'][:12]})")
    total = 0
    for meta in entries:
        try:
            key = meta["key"]
            spec, config = GemmSpec(**key["spec"]), KernelConfig(**key["config"])
            total += meta["size"]
            print(f"  {meta['digest'][:12]}  {precompile.describe_spec(spec)}  {format_config(config)}  {spec.arch}  "
                  f"{precompile.format_size(meta['size'])}  compiled in {meta['compile_seconds']:.2f} s  "
                  f"{meta['created']}")
        except (KeyError, TypeError, ValueError):
            print(f"  {meta['digest'][:12]}  (unreadable manifest entry: run `cute-moe cache verify`)")
    print(f"{len(entries)} entries, {precompile.format_size(total)}")
    for name, count in stale.items():
        print(f"stale build {name}: {count} objects (`cute-moe cache clear --stale` removes them)")
    return 0


def cache_verify(args: argparse.Namespace) -> int:
    """Check and load every entry; 1 when something was removed or skipped."""
    good, problems = cache.verify(_root(args))
    for name, reason in problems:
        print(f"  {name}: {reason}")
    print(f"{good} good entries, {len(problems)} problems")
    return 1 if problems else 0


def cache_clear(args: argparse.Namespace) -> int:
    root = _root(args)
    removed = cache.clear(root, stale_only=args.stale)
    print(f"removed {removed} objects {'of other builds ' if args.stale else ''}under {root}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cute-moe", description="cute-moe MoE GEMM kernels: build tools")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    sub = commands.add_parser("precompile", help="compile a model's specializations into the disk cache (no GPU)",
                              description=precompile.__doc__.splitlines()[0])
    precompile.add_arguments(sub)
    sub.set_defaults(handler=precompile.run)

    sub = commands.add_parser("cache", help="inspect or clean the disk cache")
    actions = sub.add_subparsers(dest="action", required=True, metavar="ACTION")
    for name, handler, text in (("ls", cache_ls, "list this build's entries"),
                                ("verify", cache_verify, "check and load every entry, remove unusable ones"),
                                ("clear", cache_clear, "delete cached objects")):
        action = actions.add_parser(name, help=text, description=text)
        action.add_argument("--cache-dir", help="cache root (default: CUTE_MOE_CACHE_DIR or the user cache dir)")
        action.set_defaults(handler=handler)
        if name == "clear":
            action.add_argument("--stale", action="store_true", help="only other builds' (fingerprints') objects")

    sub = commands.add_parser("tune", help="measure candidate configs on the GPU, write a tuned table",
                              description=tune.__doc__.splitlines()[0])
    tune.add_arguments(sub)
    sub.set_defaults(handler=tune.run)

    commands.add_parser("bench", help="benchmark against torch (GPU; `cute-moe bench --help`)", add_help=False)
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["bench"]:
        from . import bench

        bench.main(argv[1:])
        return 0
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.handler(args)
    except ValueError as e:
        parser.exit(2, f"cute-moe {args.command}: error: {e}\n")


if __name__ == "__main__":
    sys.exit(main())
