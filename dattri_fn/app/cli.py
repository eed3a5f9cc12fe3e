"""``dattri-fn``: the demo and the benchmark runner from the command line.

    dattri-fn demo [--task digits-mlp] [--methods if-cg,grad-dot,tracin,trak,rps] [--device cpu]
    dattri-fn demo --sgd --methods magic,if-explicit    (MAGIC through the SGD run)
    dattri-fn bench --task digits-mlp --methods all     (from a checkout: runs benchmarks/run.py)

Exit codes: 0 done, 2 bad arguments (unknown task, method or device; sizes too small for an
LDS or the picture; an ``--out`` that is not a folder), all refused before any training.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from .demo import DIGITS_TASKS, run_demo
from .recipes import DEMO_METHODS, METHODS


def _methods(text: str) -> list[str]:
    names = list(METHODS) if text == "all" else [m.strip() for m in text.split(",") if m.strip()]
    unknown = [m for m in names if m not in METHODS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown method(s) {unknown or [text]}; choose from {', '.join(METHODS)} or 'all'")
    return names


# A Spearman correlation over m retrained models takes few values for small m (m = 2 gives
# only +-1, m = 3 four values) and cannot be significant at 5% below m = 5.
MIN_SUBSETS = 5
# The picture shows 3 proponents and 3 opponents per test digit: 6 distinct training digits.
MIN_N_TRAIN = 6
N_DIGITS = 1797  # sklearn's bundled digits


def _at_least(minimum: int, why: str = ""):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < minimum:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {text!r}"
                                             + (f": {why}" if why else ""))
        return value

    return parse


_positive_int = _at_least(1)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dattri-fn",
        description="Functional training-data attribution on torch.func. Scores are "
                    "[n_train, n_test]; positive = the training example lowers the test loss.")
    sub = parser.add_subparsers(dest="command", metavar="{demo,bench}")
    demo = sub.add_parser(
        "demo", help="train on sklearn digits, attribute test digits, LDS table and a picture",
        description="Train a model on sklearn's bundled digits, attribute test predictions with "
                    "several methods, measure each method's linear datamodeling score (LDS) "
                    "against models retrained on random halves of the training set (cached), "
                    "print a table and write attributions.png with the strongest proponents "
                    "and opponents of a few test digits.")
    demo.add_argument("--task", choices=DIGITS_TASKS, default="digits-mlp",
                      help="bundled task (default: %(default)s)")
    demo.add_argument("--methods", type=_methods, default=list(DEMO_METHODS),
                      help=f"comma-separated methods or 'all' (default: {','.join(DEMO_METHODS)}); "
                           f"known: {', '.join(METHODS)}")
    demo.add_argument("--n-train", type=_at_least(MIN_N_TRAIN, "the picture shows 3 "
                                                  "proponents and 3 opponents per test digit"),
                      default=500, help=f"training digits, >= {MIN_N_TRAIN} (default: "
                                        f"%(default)s)")
    demo.add_argument("--n-test", type=_positive_int, default=40,
                      help="test digits attributed (default: %(default)s)")
    demo.add_argument("--subsets", type=_at_least(MIN_SUBSETS, "the LDS is a Spearman "
                                                  "correlation over the retrained models, which "
                                                  "over fewer points takes only a few values "
                                                  "(2 give only +-1) and cannot be significant"),
                      default=48, help=f"retrained models for the LDS ground truth, "
                                       f">= {MIN_SUBSETS} (default: %(default)s)")
    demo.add_argument("--models", type=_positive_int, default=3,
                      help="independently trained models for TRAK/TracIn (default: %(default)s)")
    demo.add_argument("--device", default="cpu",
                      help="torch device for attribution, e.g. cpu or cuda (default: %(default)s)")
    demo.add_argument("--out", default="out/demo",
                      help="output folder for the table, scores, picture and cache "
                           "(default: %(default)s)")
    demo.add_argument("--seed", type=int, default=0, help="data split and model seed")
    demo.add_argument("--show", type=_positive_int, default=4,
                      help="test digits drawn in the picture (default: %(default)s)")
    demo.add_argument("--quiet", action="store_true", help="no progress on stderr")
    demo.add_argument("--sgd", action="store_true",
                      help="train and retrain with mini-batch SGD on the functional trainer "
                           "(tasks.SGD_HPARAMS): the run the magic method differentiates")
    bench = sub.add_parser(
        "bench", help="run the benchmark runner (benchmarks/run.py; from a repository checkout)",
        description="Forward every argument to `python -m benchmarks.run` (see its --help).",
        add_help=False)
    bench.add_argument("args", nargs=argparse.REMAINDER)
    return parser


def _check_device(parser: argparse.ArgumentParser, device: str) -> None:
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        parser.error(f"--device: unknown device {device!r}; use cpu or cuda[:N]")
    if dev.type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device: {device!r} requested but CUDA is not available here; use cpu")
    if dev.type not in ("cpu", "cuda"):
        parser.error(f"--device: unsupported device type {dev.type!r}; use cpu or cuda[:N]")


def _check_out(parser: argparse.ArgumentParser, out: str) -> None:
    """Create the output folder now: a bad path fails before any training, not after."""
    path = Path(out)
    if path.exists() and not path.is_dir():
        parser.error(f"--out: expected a folder (for the table, scores, picture and cache), got "
                     f"{out!r}, an existing file; pass a folder path")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        parser.error(f"--out: cannot create the folder {out!r}: {e.strerror or e}")


def _bench(argv: Sequence[str]) -> int:
    root = Path(__file__).resolve().parents[1]
    if (root / "benchmarks" / "run.py").is_file() and str(root) not in sys.path:
        sys.path.insert(0, str(root))
    try:
        from benchmarks.run import main as bench_main
    except ImportError as e:
        print(f"dattri-fn bench: the benchmark runner ships with the repository, not the wheel "
              f"({e}); run it from a checkout.", file=sys.stderr)
        return 2
    return int(bench_main(list(argv)) or 0)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    if args.command == "bench":
        return _bench(args.args)
    _check_device(parser, args.device)
    if args.n_train + args.n_test > N_DIGITS:
        parser.error(f"--n-train/--n-test: expected n_train + n_test <= {N_DIGITS} (the bundled "
                     f"digits), got {args.n_train} + {args.n_test}")
    _check_out(parser, args.out)
    run_demo(task_name=args.task, methods=args.methods, n_train=args.n_train,
             n_test=args.n_test, subsets=args.subsets, models=args.models, device=args.device,
             out=args.out, seed=args.seed, show=args.show, quiet=args.quiet, sgd=args.sgd)
    return 0


if __name__ == "__main__":
    sys.exit(main())
