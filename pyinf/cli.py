"""The `pyinf` command (`python -m pyinf ...`).

    pyinf demo              every method on the embedded tasks (a tiny LoRA-tuned model, cached)
    pyinf demo --task images  ... on procedural image styles (a tiny LoRA-tuned diffusion UNet, cached)
    pyinf eval mislabeled   flipped-label detection on scikit-learn's digits, per method
    pyinf eval lds          linear datamodeling score on digits, per method
    pyinf eval mislabeled --task text   the same on a LoRA-tuned text classifier, over seeds
    pyinf eval select       data selection by influence (HyperINF): accuracy after LoRA-tuning on the top k%
    pyinf eval lds --task lm            LDS on the demo's LoRA language model (50 cached fine-tunes a seed)
    pyinf eval leakage      leaked test examples (exact and paraphrased copies) found in the top 10, per method

User errors (bad options, missing files, bad sizes) end with exit code 2 and
one line on stderr.

Under torchrun (`python -m torch.distributed.run --nproc_per_node=K -m pyinf ...`,
WORLD_SIZE set) every command runs data parallel (`pyinf.distributed`): the
process group is initialised here (gloo on CPU, NCCL with one GPU per rank),
rank 0's scores are broadcast so every rank computes the same metrics, and
only rank 0 prints and writes the output folder (the others write to a
temporary folder).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import re
import sys
import tempfile

ALL_METHODS = ("tracin", "datainf", "exact", "lissa", "hyperinf", "kfac", "ekfac", "forward")


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit code 2 (argparse prints the usage too by default)
        raise SystemExit(_fail(f"{self.prog}: {message}"))


USER_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError, PermissionError)
# what `Comm.raise_if_any` raises on the ranks where another rank failed
_OTHER_RANK_USER_ERROR = re.compile(rf"rank \d+ failed: ({'|'.join(e.__name__ for e in USER_ERRORS)}): ")


def _rank() -> int:
    """This process's rank under torchrun (WORLD_SIZE set), else 0."""
    return int(os.environ.get("RANK", "0")) if "WORLD_SIZE" in os.environ else 0


def _fail(msg: str) -> int:
    if _rank() == 0:  # under torchrun, one line from rank 0 only
        print(f"pyinf: error: {msg}", file=sys.stderr)
    return 2


def _methods(text: str) -> tuple[str, ...]:
    names = tuple(m.strip() for m in text.split(",") if m.strip())
    bad = [m for m in names if m not in ALL_METHODS]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"unknown method(s) {bad or text!r}; choose from {','.join(ALL_METHODS)}")
    return names


def _positive(cast, kind: str):
    """An argparse type: `cast(text)`, which must be > 0."""

    def parse(text: str):
        try:
            v = cast(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {kind}, got {text!r}") from None
        if not v > 0:
            raise argparse.ArgumentTypeError(f"expected {kind} > 0, got {v}")
        return v

    return parse


_positive_int = _positive(int, "an integer")
_positive_float = _positive(float, "a number")


def _list_of(parse, kind: str):
    """An argparse type: a comma-separated list of `parse` values (at least one, no repeats)."""

    def parse_list(text: str):
        values = tuple(parse(t.strip()) for t in text.split(",") if t.strip())
        if not values:
            raise argparse.ArgumentTypeError(f"expected {kind}, got {text!r}")
        if len(set(values)) != len(values):
            raise argparse.ArgumentTypeError(f"repeated values in {text!r}")
        return values

    return parse_list


def _seed(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer seed, got {text!r}") from None


_dampings = _list_of(_positive_float, "comma-separated dampings > 0")
_seeds = _list_of(_seed, "comma-separated integer seeds")


def _out_dir(path: str) -> str:
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"--out {path!r} exists and is not a folder")
    return path


def _threads(args) -> None:
    import torch

    # The models here are tiny: one thread per process is as fast as two and never
    # oversubscribes a shared machine.
    torch.set_num_threads(args.threads)


def _common(p: argparse.ArgumentParser, out: str, damping_sweep: bool = False) -> None:
    p.add_argument("--methods", type=_methods, default=ALL_METHODS,
                   help=f"comma-separated subset of {','.join(ALL_METHODS)} (forward runs once Attributor accepts it)")
    p.add_argument("--seed", type=int, default=None,
                   help="seed (default 0); on the evals that run several seeds, --seed N alone runs only N")
    if damping_sweep:  # every damping from one capture: "method@damping" rows
        p.add_argument("--damping", type=_dampings, default=(0.1,),
                       help="relative damping c, or a comma-separated sweep (e.g. 0.01,0.1,1) run from one capture")
    else:
        p.add_argument("--damping", type=_positive_float, default=0.1, help="relative damping c (every method but forward)")
    p.add_argument("--lissa-iterations", type=_positive_int, default=None, help="LiSSA's iteration budget")
    p.add_argument("--forward-lr", type=_positive_float, default=None, help="Forward-INF step size")
    p.add_argument("--out", default=out, help="output folder (default: %(default)s)")
    p.add_argument("--threads", type=_positive_int, default=1, help="torch threads (default: %(default)s)")
    shown = p.add_mutually_exclusive_group()
    shown.add_argument("--quiet", action="store_true", help="no progress output")
    shown.add_argument("--progress", action="store_true",
                       help="live progress bars even when stderr is not a terminal (default: bars on a "
                            "terminal, one line per phase otherwise)")


def _progress(args) -> bool | None:
    return False if args.quiet else (True if args.progress else None)


# The optional dependencies of each command: (module, pip extra).
NEEDS = {
    "demo": [("transformers", "hf"), ("peft", "hf"), ("matplotlib", "eval")],
    "demo --task images": [("diffusers", "diffusion"), ("peft", "hf"), ("matplotlib", "eval")],
    "eval": [("sklearn", "eval"), ("matplotlib", "eval")],
    "eval --task text": [("transformers", "hf"), ("peft", "hf"), ("matplotlib", "eval")],
    "eval leakage": [("transformers", "hf"), ("peft", "hf"), ("matplotlib", "eval")],
    "eval lds --task lm": [("transformers", "hf"), ("peft", "hf"), ("matplotlib", "eval")],
}


def require(command: str) -> None:
    """Before any work: a ValueError naming the extra to install when a dependency of `command` is missing."""
    import importlib.util

    missing = [(mod, extra) for mod, extra in NEEDS[command] if importlib.util.find_spec(mod) is None]
    if missing:
        extras = ",".join(dict.fromkeys(extra for _, extra in missing))
        raise ValueError(f"`pyinf {command}` needs {', '.join(m for m, _ in missing)}, which "
                         f"{'is' if len(missing) == 1 else 'are'} not installed: pip install 'pyinf[{extras}]'")


def _tasks(text: str) -> tuple[str, ...]:
    """An argparse type: comma-separated demo task names (no repeats), each one of ALL_TASKS."""
    from .tasks.demo import ALL_TASKS

    names = tuple(dict.fromkeys(t.strip() for t in text.split(",") if t.strip()))
    bad = [t for t in names if t not in ALL_TASKS]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"unknown task(s) {bad or text!r}; choose from {','.join(ALL_TASKS)}")
    return names


def demo(args) -> int:
    """`pyinf demo`: every method on the embedded tasks (`pyinf.tasks.demo.run_demo`); prints the table."""
    if any(t != "images" for t in args.task):
        require("demo")
    if "images" in args.task:
        require("demo --task images")
    from .tasks.demo import DemoConfig, format_table, run_demo
    from .tasks.images import ImageModelConfig
    from .tasks.model import ModelConfig

    _threads(args)
    _out_dir(args.out)
    model = ModelConfig()
    if args.tiny:  # the test suite's size: runs in seconds, numbers mean little
        model = ModelConfig(hidden=32, layers=1, heads=2, intermediate=64, pretrain_texts=200, pretrain_epochs=1,
                            finetune_epochs=1)
    images = ImageModelConfig()
    if args.tiny:
        images = ImageModelConfig(size=8, channels=(8, 16), cross_attention_dim=8, attention_head_dim=4,
                                  pretrain_images=64, pretrain_epochs=1, finetune_epochs=1, draws=1)
    sizes = {}  # --n-train / --n-test: every task's per-class sizes when given (defaults: 90/10 LM, 30/5 images)
    if args.n_train is not None:
        sizes.update(n_train=args.n_train, image_n_train=args.n_train)
    if args.n_test is not None:
        sizes.update(n_test=args.n_test, image_n_test=args.n_test)
    cfg = DemoConfig(seed=args.seed or 0, methods=args.methods, damping=args.damping, model=model, tasks=args.task,
                     images=images, out=args.out, cache=_cache_option(args), use_cache=not args.no_cache,
                     progress=_progress(args), **sizes)
    _method_options(args, cfg)
    if args.forward_queries < 0:
        raise ValueError(f"--forward-queries must be >= 0, got {args.forward_queries}")
    cfg.forward_queries = args.forward_queries
    report = run_demo(cfg)
    print(format_table(report))
    grid = ", images_grid.png" if "images_grid.png" in str(report["tasks"].get("images", {}).get("files")) else ""
    print(f"\nscores, report and figure saved under {args.out}/ (demo_scores.pt, demo_report.json, demo.png{grid})")
    return 0


def _cache_option(args) -> str | None:
    """--cache, checked: a folder, or a path not there yet (None: $PYINF_CACHE or ~/.cache/pyinf)."""
    if args.cache is not None and os.path.exists(args.cache) and not os.path.isdir(args.cache):
        raise ValueError(f"--cache {args.cache!r} exists and is not a folder")
    return args.cache


def _seeds_option(args, cfg) -> None:
    """--seeds, else --seed alone: that one seed; else the eval's default seeds."""
    if args.seeds is not None:
        cfg.seeds = args.seeds
    elif args.seed is not None:
        cfg.seeds = (args.seed,)


def _method_options(args, cfg) -> None:
    """--lissa-iterations and --forward-lr where given (else the config's defaults)."""
    if args.lissa_iterations:
        cfg.lissa_iterations = args.lissa_iterations
    if args.forward_lr:
        cfg.forward_lr = args.forward_lr


def _report(args, cfg, run, format_table, files: str) -> int:
    """Run the eval, print its table and where its files went."""
    report = run(cfg)
    print(format_table(report))
    print(f"report and figure saved under {args.out}/ ({files})")
    return 0


def _run_eval(args, cfg, run, format_table, files: str) -> int:
    """What both evals share: threads, the output folder, the method options, the report."""
    require("eval")
    _threads(args)
    _out_dir(args.out)
    if hasattr(args, "steps"):  # the digits MLP's
        cfg.steps, cfg.hidden = args.steps, args.hidden
    cfg.damping, cfg.seed = args.damping, args.seed or 0
    if isinstance(args.damping, tuple):  # a damping sweep
        cfg.damping, cfg.dampings = args.damping[0], args.damping
    cfg.methods, cfg.out, cfg.progress = args.methods, args.out, _progress(args)
    _method_options(args, cfg)
    return _report(args, cfg, run, format_table, files)


def _text_options(args, cfg) -> None:
    """The text task's seeds, model size and cache (`pyinf eval mislabeled --task text`, `pyinf eval select`)."""
    from .tasks.text_classes import TINY

    if args.task == "text":
        require("eval --task text")
        # the demo's settings for a LoRA model (--forward-lr, --lissa-iterations override): LiSSA's self-influence
        # runs its iterations for every training point, 300 would take ~3 min a seed here
        cfg.forward_lr, cfg.lissa_iterations = 1e-3, 100
        cfg.seeds = (0, 1, 2)
    _seeds_option(args, cfg)
    if args.tiny:
        cfg.text_model = TINY
    cfg.cache, cfg.use_cache = _cache_option(args), not args.no_cache


def _text_arguments(p: argparse.ArgumentParser, seeds: str) -> None:
    p.add_argument("--seeds", type=_seeds, default=None,
                   help=f"comma-separated seeds, each a new data set, flips and model; mean ± sd over them "
                        f"(default: {seeds})")
    p.add_argument("--cache", default=None, help="text model cache folder (default: $PYINF_CACHE or ~/.cache/pyinf)")
    p.add_argument("--no-cache", action="store_true", help="train the text models again, do not read or write the cache")
    p.add_argument("--tiny", action="store_true", help="a tiny text model trained in seconds (smoke tests)")


def eval_mislabeled(args) -> int:
    """`pyinf eval mislabeled`: flipped-label detection on digits or (--task text) a LoRA text classifier."""
    from .evals.mislabeled import MislabeledConfig, format_table, run_mislabeled

    cfg = MislabeledConfig(n_train=args.n_train, n_val=args.n_val, flip=args.flip, task=args.task)
    _text_options(args, cfg)
    return _run_eval(args, cfg, run_mislabeled, format_table, "mislabeled_report.json, mislabeled.png")


def eval_select(args) -> int:
    """`pyinf eval select`: HyperINF's data selection on the noisy LoRA text task."""
    from .evals.select import SelectConfig, format_table, run_select

    cfg = SelectConfig(n_train=args.n_train, n_val=args.n_val, n_test=args.n_test, flip=args.flip, keep=args.keep)
    args.task = "text"
    _text_options(args, cfg)
    return _run_eval(args, cfg, run_select, format_table, "select_report.json, select.png")


def eval_lds(args) -> int:
    """`pyinf eval lds`: the linear datamodeling score on digits or (--task lm) the demo's LoRA LM."""
    from .evals.lds import LDSConfig, format_table, run_lds

    lm = args.task == "lm"
    other_task = ({"--steps": args.steps, "--hidden": args.hidden} if lm else
                  {"--seeds": args.seeds, "--cache": args.cache, "--no-cache": args.no_cache or None,
                   "--finetune-epochs": args.finetune_epochs, "--tiny": args.tiny or None})
    given = [k for k, v in other_task.items() if v is not None]
    if given:  # accepted by the parser for the other task: never silently ignored
        raise ValueError(f"{', '.join(given)} appl{'ies' if len(given) == 1 else 'y'} to "
                         f"--task {'digits' if lm else 'lm'} only")
    if lm:
        return eval_lds_lm(args)
    args.steps, args.hidden = _or(args.steps, 300), _or(args.hidden, 32)
    cfg = LDSConfig(n_train=_or(args.n_train, 500), n_query=_or(args.n_query, 100), subsets=_or(args.subsets, 100),
                    fraction=args.fraction)
    return _run_eval(args, cfg, run_lds, format_table, "lds_report.json, lds.png")


def _or(value, default):
    return default if value is None else value


def _lm_eval(args, cfg, command: str, run, format_table, files: str) -> int:
    """What the LoRA language-model evals share: threads, output folder, cache, model size, method options."""
    from .evals.lm import TINY_MODEL

    require(command)
    _threads(args)
    _out_dir(args.out)
    if args.tiny:
        cfg.model = TINY_MODEL
    if args.finetune_epochs:
        cfg.model = dataclasses.replace(cfg.model, finetune_epochs=args.finetune_epochs)
    cfg.methods, cfg.damping, cfg.out = args.methods, args.damping, args.out
    cfg.cache, cfg.use_cache, cfg.progress = _cache_option(args), not args.no_cache, _progress(args)
    _seeds_option(args, cfg)
    _method_options(args, cfg)
    return _report(args, cfg, run, format_table, files)


def eval_lds_lm(args) -> int:
    """`pyinf eval lds --task lm`: LDS over LoRA fine-tunes of the demo's LM on random halves (cached)."""
    from .evals.lds_lm import LMLDSConfig, format_table, run_lds_lm

    cfg = LMLDSConfig(fraction=args.fraction)
    cfg.n_train, cfg.n_query = _or(args.n_train, cfg.n_train), _or(args.n_query, cfg.n_query)
    cfg.subsets = _or(args.subsets, cfg.subsets)
    return _lm_eval(args, cfg, "eval lds --task lm", run_lds_lm, format_table, "lds_lm_report.json, lds_lm.png")


def eval_leakage(args) -> int:
    """`pyinf eval leakage`: planted exact and paraphrased copies of test examples, found in each top 10."""
    from .evals.leakage import LeakageConfig, format_table, run_leakage

    cfg = LeakageConfig(n_train=args.n_train, n_test=args.n_test, n_leak=args.n_leak, copies=args.copies,
                        top=args.top)
    return _lm_eval(args, cfg, "eval leakage", run_leakage, format_table, "leakage_report.json, leakage.png")


def _lm_arguments(p: argparse.ArgumentParser) -> None:
    """The options of the LoRA language-model evals (beside `_common`'s; --seed alone: that one seed)."""
    p.add_argument("--seeds", type=_seeds, default=None,
                   help="comma-separated seeds, one run each (its data; the base and adapter init are the demo's "
                        "in every run); mean ± sd over them (default: 0,1,2)")
    p.add_argument("--cache", default=None, help="model cache folder (default: $PYINF_CACHE or ~/.cache/pyinf)")
    p.add_argument("--no-cache", action="store_true", help="train every model again, do not read or write the cache")
    p.add_argument("--finetune-epochs", type=_positive_int, default=None, help="LoRA fine-tune epochs")
    p.add_argument("--tiny", action="store_true", help="a tiny model trained in seconds (smoke tests)")


def build_parser() -> argparse.ArgumentParser:
    """The `pyinf` argument parser: demo and eval's subcommands, one line and exit code 2 on bad options."""
    parser = _Parser(prog="pyinf", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    p = sub.add_parser("demo", help="every method on the embedded sentence and math tasks (--task images: images)")
    _common(p, "pyinf-out")
    p.add_argument("--task", type=_tasks, default=("sentences", "math"),
                   help="comma-separated subset of sentences,math,images (default: sentences,math)")
    p.add_argument("--n-train", type=_positive_int, default=None,
                   help="training examples per class (default: 90; images: 30)")
    p.add_argument("--n-test", type=_positive_int, default=None,
                   help="test examples (queries) per class (default: 10; images: 5)")
    p.add_argument("--cache", default=None, help="model cache folder (default: $PYINF_CACHE or ~/.cache/pyinf)")
    p.add_argument("--no-cache", action="store_true", help="train the model again, do not read or write the cache")
    p.add_argument("--forward-queries", type=int, default=3,
                   help="queries per class for forward (m x n forward passes; 0 = all; default: %(default)s)")
    p.add_argument("--tiny", action="store_true", help="a tiny model trained in seconds (smoke tests)")
    p.set_defaults(func=demo)

    ev = sub.add_parser("eval", help="benchmarks: mislabeled, lds, select, leakage")
    esub = ev.add_subparsers(dest="eval", required=True, parser_class=_Parser)
    p = esub.add_parser("mislabeled", help="flipped-label detection on digits or a LoRA-tuned text classifier")
    _common(p, "pyinf-out", damping_sweep=True)
    p.add_argument("--task", choices=("digits", "text"), default="digits",
                   help="digits: an MLP on scikit-learn's digits; text: a LoRA-tuned transformer classifier on "
                        "generated sentences (default: %(default)s)")
    p.add_argument("--n-train", type=_positive_int, default=1000)
    p.add_argument("--n-val", type=_positive_int, default=300)
    p.add_argument("--flip", type=float, default=0.2, help="fraction of training labels flipped")
    p.add_argument("--steps", type=_positive_int, default=300, help="full-batch Adam steps (digits)")
    p.add_argument("--hidden", type=_positive_int, default=32, help="MLP width (digits)")
    _text_arguments(p, "--seed alone on digits, 0,1,2 on text")
    p.set_defaults(func=eval_mislabeled)
    p = esub.add_parser("select", help="data selection by influence on a noisy LoRA text task (HyperINF)")
    _common(p, "pyinf-out", damping_sweep=True)
    p.add_argument("--n-train", type=_positive_int, default=1000, help="training pool size")
    p.add_argument("--n-val", type=_positive_int, default=100, help="clean validation examples the pool is scored on")
    p.add_argument("--n-test", type=_positive_int, default=1000, help="clean test examples")
    p.add_argument("--flip", type=float, default=0.2, help="fraction of the pool's labels flipped")
    p.add_argument("--keep", type=_list_of(_positive_float, "comma-separated percentages"), default=(20.0, 50.0),
                   help="percentages of the pool to keep, each in (0, 100) (default: 20,50)")
    _text_arguments(p, "0,1,2")
    p.set_defaults(func=eval_select)
    p = esub.add_parser("lds", help="linear datamodeling score on digits")
    _common(p, "pyinf-out")
    p.add_argument("--task", choices=("digits", "lm"), default="digits",
                   help="digits: the MLP on scikit-learn's digits; lm: the demo's LoRA language model, cached "
                        "fine-tunes (default: %(default)s)")
    p.add_argument("--n-train", type=_positive_int, default=None,
                   help="training points (digits, default 500) / examples per class and task (lm, default 20)")
    p.add_argument("--n-query", type=_positive_int, default=None,
                   help="queries (digits, default 100) / per class and task (lm, default 2)")
    p.add_argument("--subsets", type=_positive_int, default=None, help="retrained models (digits 100, lm 50)")
    p.add_argument("--fraction", type=float, default=0.5, help="subset size as a fraction of the training set")
    p.add_argument("--steps", type=_positive_int, default=None, help="full-batch Adam steps (digits; default 300)")
    p.add_argument("--hidden", type=_positive_int, default=None, help="MLP width (digits; default 32)")
    _lm_arguments(p)
    p.set_defaults(func=eval_lds)
    p = esub.add_parser("leakage", help="leaked test examples found by influence on the demo's LoRA model")
    _common(p, "pyinf-out")
    p.add_argument("--n-train", type=_positive_int, default=90, help="training examples per class and task")
    p.add_argument("--n-test", type=_positive_int, default=10, help="test examples per class and task")
    p.add_argument("--n-leak", type=_positive_int, default=10, help="leaked test examples per task")
    p.add_argument("--copies", type=_positive_int, default=1, help="exact, and paraphrased, copies per leaked example")
    p.add_argument("--top", type=_positive_int, default=10, help="a copy is found when in this many most helpful")
    _lm_arguments(p)
    p.set_defaults(func=eval_leakage)
    return parser


def _init_process_group(stack: contextlib.ExitStack) -> None:
    """Under torchrun: the default process group (NCCL on GPUs, gloo on CPUs), destroyed on leaving `stack`."""
    import torch
    import torch.distributed as dist

    if dist.is_initialized():  # the caller's group: theirs to destroy
        return
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl")
    else:
        dist.init_process_group("gloo")
    stack.callback(dist.destroy_process_group)


def main(argv: list[str] | None = None) -> int:
    """Entry point: parse `argv`, run the command (under torchrun: in the process group); the exit code."""
    rank = _rank()
    with contextlib.ExitStack() as stack:
        if rank != 0:  # under torchrun only rank 0 prints
            stack.enter_context(contextlib.redirect_stdout(stack.enter_context(open(os.devnull, "w"))))
        try:
            args = build_parser().parse_args(argv)
        except SystemExit as e:  # --help exits 0; errors already printed their line
            return e.code if isinstance(e.code, int) else 2
        try:
            if "WORLD_SIZE" in os.environ:
                _init_process_group(stack)
                if rank != 0:  # same checks as rank 0, then no progress and no output files
                    _out_dir(args.out)
                    args.out = stack.enter_context(tempfile.TemporaryDirectory(prefix=f"pyinf-rank{rank}-"))
                    args.quiet = True
            return args.func(args)
        except USER_ERRORS as e:
            return _fail(str(e))
        except RuntimeError as e:
            if _OTHER_RANK_USER_ERROR.match(str(e)):  # a user error raised on another rank
                return _fail(str(e))
            raise
        except KeyboardInterrupt:
            return _fail("interrupted")


if __name__ == "__main__":
    sys.exit(main())
