"""Command line: ``mllmcal demo | eval | fit | report | bench``.

* ``demo [--out DIR] [--retrain]``: the embedded default, offline: the shipped tiny LLaVA
  on the shapes VQA set (rendered on first use), the whole method, the summary and what it
  shows; ``--retrain`` first reruns the recipe that made the shipped model.
* ``eval --model PATH[,key=value...] [--model PATH2 ...] --test FILE ... --out DIR``: the
  paper's method on any local checkpoint(s), side by side (options: ``mllmcal eval
  --help``). ``--model demo`` is the shipped demo checkpoint (resolved here through
  ``mllmcal.demo.demo_model_dir``).
* ``fit --model PATH --calib FILE``: fit and print the temperature only.
* ``report DIR``: print the summary of ``DIR/report.json`` and re-render report.md/plots.
* ``bench``: the benchmark suite (``mllmcal.benchmarks.run_suite``).

Works under ``torchrun --nproc_per_node N -m mllmcal eval ...`` (items are sharded).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

__all__ = ["main", "build_parser"]

#: ``--temperature-method`` values: mllmcal.eval's methods and the deprecated "newton"
_TEMPERATURE_CHOICES = ["grid", "onepass", "newton"]


def _add_eval_args(p: argparse.ArgumentParser, need_model: bool = True) -> None:
    p.add_argument("--model", action="append", default=[] if not need_model else None,
                   required=need_model, metavar="PATH[,key=value...]",
                   help="local checkpoint dir or 'demo'; repeat for a side-by-side comparison. "
                        "Per-model options after commas: name=, dtype=, chat_template=auto|off, "
                        "device_map= (e.g. ./a,dtype=bf16,name=A)")
    p.add_argument("--data", metavar="DIR",
                   help="directory with test/calib/dev/idk as .json, .jsonl, .parquet or "
                        "Hugging Face dataset folders (save_to_disk), and images/")
    p.add_argument("--test", metavar="FILE", help="test split (LLaVA JSON, JSONL, parquet or a "
                   "Hugging Face dataset folder)")
    p.add_argument("--calib", metavar="FILE", help="split on which T is fitted")
    p.add_argument("--dev", metavar="FILE", help="split on which prompts are optimised")
    p.add_argument("--idk", metavar="FILE", help="IDK split (default: built from the test split)")
    p.add_argument("--images", metavar="DIR", help="directory that image names resolve against")
    _add_column_args(p)
    p.add_argument("--out", default="mllmcal-out", metavar="DIR", help="output directory")
    # The options a --protocol presets default to None here, so that one given on the
    # command line is known to be meant and wins over the preset (EvalConfig.keep).
    p.add_argument("--method", default=None, choices=["letter", "option-softmax", "verbalized"],
                   help="default: letter")
    p.add_argument("--modalities", default="image,text",
                   help="comma list of image,text (image is skipped for text-only models)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--device-map", metavar="MAP",
                   help="e.g. 'auto': spread models larger than one device over all of them "
                        "(needs accelerate)")
    _add_engine_args(p)
    p.add_argument("--protocol", choices=["paper"],
                   help="preset: 'paper' = Chen et al. (COLING 2025): 'Answer: (' prompt, up to "
                        "20 greedy tokens, first option-letter token, 10 bins, grid T search, the "
                        "paper's seed prompts; --method, --max-new-tokens, --n-bins and "
                        "--temperature-method given as well are kept as given")
    p.add_argument("--dtype", default="auto", help="auto|float32|float16|bfloat16")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=None, help="default: 20")
    p.add_argument("--n-bins", type=int, default=None, help="default: 10")
    p.add_argument("--temperature-method", default=None, choices=_TEMPERATURE_CHOICES,
                   help="grid (the paper's 999 temperatures) or onepass (the continuous optimum "
                        "from one pass); default: grid. 'newton' is the deprecated name of onepass")
    p.add_argument("--chat-template", default="auto", choices=["auto", "off"])
    p.add_argument("--no-idk", action="store_true", help="skip the IDK evaluation")
    p.add_argument("--optimize-prompts", action="store_true", help="run APE on the dev split (--dev, or dev in --data; an error without one)")
    p.add_argument("--ape-k", type=int, default=5)
    p.add_argument("--ape-m", type=int, default=5)
    p.add_argument("--ape-rounds", type=int, default=10)
    p.add_argument("--proposer", default="bank",
                   help="'bank' (offline), an OpenAI-compatible URL, or a causal LM dir")
    p.add_argument("--limit", type=int, help="use only the first N items of each split")
    p.add_argument("--alpha", type=float, default=0.1,
                   help="error rate of the conformal prediction sets (LAC, APS) calibrated "
                        "on the calib split (default: 0.1, i.e. 90%% coverage)")
    p.add_argument("--target-risk", type=float, default=0.1,
                   help="selective answering: the confidence threshold whose calib error rate "
                        "among answered items stays at most this (default: 0.1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--no-plots", action="store_true")


def _add_engine_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("engine", "--engine vllm runs generation in vLLM's offline LLM "
                             "(vLLM must be installed where the eval runs); the options below "
                             "go to LLM(...) as given")
    g.add_argument("--engine", default="hf", choices=["hf", "vllm"],
                   help="hf: transformers generate (default); vllm: vLLM's offline engine")
    g.add_argument("--tensor-parallel-size", type=int, metavar="N")
    g.add_argument("--data-parallel-size", type=int, metavar="N")
    g.add_argument("--engine-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="any other LLM(...) argument, VALUE read as JSON when it parses "
                        "(e.g. --engine-arg gpu_memory_utilization=0.8); repeatable")


def _engine_args(args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for text in args.engine_arg:
        key, sep, value = text.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--engine-arg {text!r} is not KEY=VALUE")
        try:
            out[key.strip().replace("-", "_")] = json.loads(value)
        except json.JSONDecodeError:
            out[key.strip().replace("-", "_")] = value
    for name in ("tensor_parallel_size", "data_parallel_size"):
        if getattr(args, name) is not None:
            out[name] = getattr(args, name)
    return out


def _add_column_args(p: argparse.ArgumentParser) -> None:
    from mllmcal.eval.data import FORMAT_NAMES

    p.add_argument("--format", choices=FORMAT_NAMES, default=None, metavar="NAME",
                   help="the splits' layout: " + ", ".join(FORMAT_NAMES) + " (default: "
                        "recognised from the file and its columns: VLMEvalKit TSV, the "
                        "lmms-eval layouts, LLaVA JSON, JSONL)")
    g = p.add_argument_group("data columns", "field names of JSONL records or Hugging Face "
                             "dataset columns, when they are not question/options/answer/image/id")
    for field_name in ("question", "options", "answer", "image", "id"):
        g.add_argument(f"--{field_name}-column", metavar="NAME", dest=f"{field_name}_column")


def _columns(args: argparse.Namespace) -> dict[str, str]:
    return {f: getattr(args, f"{f}_column") for f in ("question", "options", "answer", "image", "id")
            if getattr(args, f"{f}_column", None)}


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="mllmcal", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="command", required=True)

    d = sub.add_parser("demo", help="offline end-to-end demo (shapes VQA + tiny LLaVA)")
    d.add_argument("--out", default="mllmcal-demo", metavar="DIR")
    d.add_argument("--ape-rounds", type=int, default=2,
                   help="prompt-optimisation rounds (the paper's 10 do not fit the demo's 90 s)")
    d.add_argument("--ape-k", type=int, default=3)
    d.add_argument("--ape-m", type=int, default=3)
    d.add_argument("--limit", type=int, help="use only the first N items of each split")
    # Demo-sized defaults: the demo (the shipped model, nothing trained) must finish in 90 s
    # on 2 CPU cores; `mllmcal eval` keeps the full splits and the paper's grid fit.
    d.add_argument("--n-test", type=int, default=1000, help="test items")
    d.add_argument("--n-calib", type=int, default=1000, help="calib items T is fitted on")
    d.add_argument("--n-dev", type=int, default=100, help="dev items APE scores prompts on")
    d.add_argument("--n-idk", type=int, default=200, help="IDK items per abstention prompt")
    d.add_argument("--batch-size", type=int, default=32)
    d.add_argument("--temperature-method", default="onepass", choices=_TEMPERATURE_CHOICES)
    # One thread by default: on a busy machine two OpenMP threads were measured several
    # times slower than one for this tiny model, and a fixed count keeps the report's
    # floating-point results the same from machine to machine.
    d.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads for the evaluation (0: torch's default, one per core)")
    d.add_argument("--no-progress", action="store_true")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--retrain", action="store_true",
                   help="rerun the training recipe of the shipped model (minutes) into "
                        "OUT/retrained-model, compare its weights, and evaluate it")

    e = sub.add_parser("eval", help="evaluate local checkpoint(s) with the paper's method")
    _add_eval_args(e)

    f = sub.add_parser("fit", help="fit the temperature on a calib split and print it")
    f.add_argument("--model", required=True, metavar="PATH")
    f.add_argument("--calib", metavar="FILE")
    f.add_argument("--data", metavar="DIR")
    f.add_argument("--images", metavar="DIR")
    _add_column_args(f)
    f.add_argument("--method", default="letter", choices=["letter", "option-softmax"])
    f.add_argument("--modality", default="image", choices=["image", "text"])
    f.add_argument("--temperature-method", default="grid", choices=_TEMPERATURE_CHOICES)
    f.add_argument("--device", default="cpu")
    f.add_argument("--device-map", metavar="MAP", help="e.g. 'auto' (needs accelerate)")
    f.add_argument("--dtype", default="auto")
    f.add_argument("--batch-size", type=int, default=8)
    f.add_argument("--out", default="mllmcal-out", metavar="DIR", help="cache directory")
    f.add_argument("--limit", type=int)

    r = sub.add_parser("report", help="print and re-render an existing report")
    r.add_argument("path", help="output directory or report.json")

    sub.add_parser("bench", help="run the benchmark suite")
    # Parsed by mllmcal.integrations.vllm.serve (vLLM's arguments pass through); listed
    # here for --help.
    sub.add_parser("serve", help="vLLM's OpenAI server with mllmcal's statistics in the "
                   "responses (mllmcal serve --help)", add_help=False)
    return ap


class _UsageError(ValueError):
    """A command line that cannot work (missing files, impossible values)."""


def _split_paths(args: argparse.Namespace) -> dict[str, str | None]:
    from mllmcal.eval.data import find_split

    paths = {s: getattr(args, s, None) for s in ("test", "calib", "dev", "idk")}
    for split, path in paths.items():
        if path is not None and not Path(path).exists():
            raise _UsageError(f"--{split} {path}: no such file or directory")
    if getattr(args, "data", None):
        if not Path(args.data).is_dir():
            raise _UsageError(f"--data {args.data}: no such directory")
        for s in paths:
            if paths[s] is None:
                found = find_split(args.data, s)
                paths[s] = str(found) if found else None
        if args.images is None and (Path(args.data) / "images").is_dir():
            args.images = str(Path(args.data) / "images")
    return paths


def _check_out_and_limit(args: argparse.Namespace) -> None:
    """``--out`` names a directory (or nothing yet) and ``--limit`` a positive count."""
    if Path(args.out).exists() and not Path(args.out).is_dir():
        raise _UsageError(f"--out {args.out}: is a file; --out names the output directory")
    if args.limit is not None and args.limit < 1:
        raise _UsageError(f"--limit must be a positive number of items, got {args.limit}")


def _model_specs(models: list[str]) -> list[Any]:
    """``--model`` values as ModelSpecs; ``demo`` becomes the shipped checkpoint's path,
    named "demo" (the CLI resolves it: mllmcal.eval does not know the demo)."""
    from mllmcal.eval.runner import parse_model_spec

    specs = []
    for text in models:
        spec = parse_model_spec(text)
        if spec.path == "demo":
            try:
                from mllmcal.demo import demo_model_dir
            except ImportError as exc:
                raise _UsageError(f"--model demo: the embedded demo is not available in this "
                                  f"install ({exc})") from None
            spec.path = str(demo_model_dir())
            spec.name = spec.name or "demo"
        specs.append(spec)
    return specs


def _print_summary(summary: dict[str, Any]) -> None:
    print("summary:")
    for k, v in summary.items():
        if k == "models" and isinstance(v, list):
            if len(v) > 1:
                print("  models:")
                for m in v:
                    vals = ", ".join(f"{kk}={vv:.4f}" if isinstance(vv, float) else f"{kk}={vv}"
                                     for kk, vv in m.items() if kk != "model")
                    print(f"    {m['model']}: {vals}")
            continue
        if k == "failed":
            if v:
                print(f"  failed: {', '.join(v)}")
            continue
        if isinstance(v, float):
            v = f"{v:.4f}"
        elif isinstance(v, dict):
            v = json.dumps(v)
        print(f"  {k}: {v}")


def _cmd_eval(args: argparse.Namespace) -> int:
    from mllmcal.eval.runner import EvalConfig, run_eval

    _check_out_and_limit(args)
    paths = _split_paths(args)
    if paths["test"] is None:
        print("mllmcal eval: a test split is needed (--test FILE or --data DIR with test.json)",
              file=sys.stderr)
        return 2
    preset = ("method", "max_new_tokens", "n_bins", "temperature_method")
    args.temperature_method = _temperature_method(args.temperature_method)
    given = {k: getattr(args, k) for k in preset if getattr(args, k) is not None}
    defaults = {f: EvalConfig.__dataclass_fields__[f].default for f in preset}
    chosen = {**defaults, **given}
    # the options of the same name in EvalConfig
    same = ("device_map", "protocol", "images", "out", "device", "dtype", "batch_size",
            "chat_template", "optimize_prompts", "ape_k", "ape_m", "ape_rounds", "proposer",
            "limit", "seed", "format", "alpha", "target_risk", "engine")
    cfg = EvalConfig(
        models=_model_specs(args.model), keep=tuple(given), columns=_columns(args), **paths,
        **chosen, **{k: getattr(args, k) for k in same},
        modalities=tuple(m.strip() for m in args.modalities.split(",") if m.strip()),
        build_idk=not args.no_idk, idk_variants=() if args.no_idk else ("plain", "invite", "strict"),
        progress=not args.no_progress, plots=not args.no_plots, engine_args=_engine_args(args),
    )
    _print_report(run_eval(cfg), Path(args.out))
    return 0


def _print_report(report: dict[str, Any], out: Path) -> None:
    if int(os.environ.get("RANK", "0")) == 0:
        _print_summary(report["summary"])
        print(f"report: {out / 'report.json'}")


def _temperature_method(name: str | None) -> str | None:
    """``--temperature-method`` as given; the deprecated ``newton`` is said on stderr (the
    DeprecationWarning that EvalConfig raises is hidden outside ``__main__``)."""
    if name == "newton":
        print("mllmcal: --temperature-method newton is deprecated (it runs the one-pass fit); "
              "use onepass", file=sys.stderr)
    return name


def _cmd_demo(args: argparse.Namespace) -> int:
    # The shipped checkpoint (mllmcal/demo/checkpoint) is evaluated as ``--model demo``, so
    # the report names it "demo"; nothing is trained unless --retrain asks for it.
    try:
        from mllmcal.demo import train as demo_train
    except ImportError as exc:
        print(f"mllmcal demo: the embedded demo (mllmcal.demo) is not available: {exc}",
              file=sys.stderr)
        return 1
    _check_out_and_limit(args)
    out = Path(args.out)
    model = "demo"
    if args.retrain:
        retrained = out / "retrained-model"
        summary = demo_train.retrain(retrained, progress=not args.no_progress)
        same = summary["identical_to_shipped"]
        print(f"retrained {summary['steps']} steps in {summary['train_seconds']:.0f} s into "
              f"{retrained}; weights "
              + ("identical to the shipped checkpoint" if same else
                 "DIFFER from the shipped checkpoint (max |diff| "
                 f"{summary['max_abs_diff_to_shipped']:.3g}; other CPU or library versions)"
                 if same is False else "(no shipped checkpoint to compare with)"))
        model = str(retrained)
    _, data_dir = demo_train.get_demo(progress=not args.no_progress)
    if args.threads > 0:
        import torch

        torch.set_num_threads(args.threads)
    from mllmcal.demo.evaluate import demo_eval_config
    from mllmcal.eval.runner import run_eval

    limits = {"test": args.n_test, "calib": args.n_calib, "dev": args.n_dev, "idk": args.n_idk}
    for split, n in limits.items():
        if n < 1:  # a negative count would be taken as a slice from the end
            raise _UsageError(f"--n-{split} must be a positive number of items, got {n}")
    if args.limit:  # --limit caps every split, below the demo sizes too
        limits = {k: min(v, args.limit) for k, v in limits.items()}
    from mllmcal.eval.data import find_split

    cfg = demo_eval_config(
        _model_specs([model])[0], data_dir, out, split_limits=limits, limit=args.limit,
        # the demo's data has a dev split; data without one (a stand-in) runs without APE
        optimize_prompts=find_split(data_dir, "dev") is not None, ape_rounds=args.ape_rounds, ape_k=args.ape_k, ape_m=args.ape_m,
        seed=args.seed, batch_size=args.batch_size,
        temperature_method=_temperature_method(args.temperature_method),
        progress=not args.no_progress)
    _print_report(run_eval(cfg), out)
    if int(os.environ.get("RANK", "0")) == 0:
        # What each result shows, with its numbers: appended to report.md and printed.
        from mllmcal.demo.findings import findings_markdown

        section = findings_markdown(json.loads((out / "report.json").read_text()))
        with open(out / "report.md", "a") as fh:
            fh.write("\n" + section)
        print(section, end="")
    return 0


def _cmd_fit(args: argparse.Namespace) -> int:
    from mllmcal.eval.runner import fit_calib_temperature

    _check_out_and_limit(args)
    paths = _split_paths(args)
    if paths["calib"] is None:
        print("mllmcal fit: a calib split is needed (--calib FILE or --data DIR)", file=sys.stderr)
        return 2
    spec = _model_specs([args.model])[0]
    spec.device_map = spec.device_map or args.device_map
    res = fit_calib_temperature(spec, paths["calib"], args.out,
                                images=args.images, modality=args.modality,
                                method=args.method,
                                temperature_method=_temperature_method(args.temperature_method),
                                device=args.device, dtype=args.dtype,
                                batch_size=args.batch_size, limit=args.limit,
                                columns=_columns(args), format=args.format)
    if res["temperature"] is None:
        print("mllmcal fit: no calib item produced an answer letter; cannot fit", file=sys.stderr)
        return 1
    print(json.dumps(res))
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from mllmcal.eval._jsonio import JSONInputError, read_json
    from mllmcal.eval.report import report_problem, write_report

    p = Path(args.path)
    path = p / "report.json" if p.is_dir() else p
    if not path.is_file():
        print(f"mllmcal report: {path} does not exist", file=sys.stderr)
        return 2
    try:
        report = read_json(path)
    except JSONInputError as exc:
        print(f"mllmcal report: {exc}", file=sys.stderr)
        return 2
    problem = report_problem(report)
    if problem:
        print(f"mllmcal report: {path}: not an mllmcal report ({problem})", file=sys.stderr)
        return 2
    try:
        write_report(report, path.parent)
    except (KeyError, TypeError, ValueError, IndexError, AttributeError) as exc:
        print(f"mllmcal report: {path}: malformed report ({type(exc).__name__}: {exc})",
              file=sys.stderr)
        return 2
    _print_summary(report["summary"])
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    try:
        from mllmcal.benchmarks import run_suite
    except ImportError as exc:
        print(f"mllmcal bench: the benchmark suite (mllmcal.benchmarks.run_suite) is not "
              f"available in this install: {exc}", file=sys.stderr)
        return 1
    result = run_suite()
    return int(result) if isinstance(result, int) else 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``mllmcal`` command; returns the exit status."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["serve"]:
        from mllmcal.integrations.vllm.serve import main as serve_main

        return serve_main(argv[1:])
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(levelname)s: %(message)s")
    from mllmcal.eval.data import DataError

    handlers = {"demo": _cmd_demo, "eval": _cmd_eval, "fit": _cmd_fit, "report": _cmd_report,
                "bench": _cmd_bench}
    try:
        return handlers[args.command](args)
    except (DataError, FileNotFoundError, NotADirectoryError, ValueError, ImportError) as exc:
        # ImportError: a missing optional package (MissingDependencyError names it and the
        # model)
        print(f"mllmcal {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except RecursionError:
        # a JSON input nested deeper than the parser can go, read where the file is not yet
        # named (inputs read through mllmcal.eval._jsonio say which file)
        print(f"mllmcal {args.command}: error: an input (a JSON file?) is nested too deeply "
              f"to read", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
