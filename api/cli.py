"""The `saeforge` command line. Heavy modules (torch, ray) are imported inside the commands that need them."""

from __future__ import annotations

import argparse
import sys

from api.jobspec import JobSpecError, load_job_spec


def _progress_printer():
    from tqdm import tqdm

    bar: dict = {}

    def show(progress) -> None:
        if "bar" not in bar:
            bar["bar"] = tqdm(total=progress.tokens_total, unit="tok", unit_scale=True, desc="training",
                              dynamic_ncols=True)
        b = bar["bar"]
        b.update(progress.tokens_done - b.n)
        first = next(iter(progress.latest.values()), {})
        b.set_postfix({"tok/s": f"{progress.tokens_per_s:,.0f}", "FVU": f"{first.get('fvu', float('nan')):.3f}",
                       "L0": f"{first.get('l0', float('nan')):.1f}"}, refresh=True)

    def close() -> None:
        if "bar" in bar:
            bar["bar"].close()

    return show, close


def summary(result) -> str:
    lines = [f"job {result.job_id} finished in {result.seconds:,.0f} s"]
    for name, r in result.dictionaries.items():
        rate = r.get("tokens", 0) / max(r.get("train_seconds", 0) or result.seconds, 1e-9)
        lines += [
            f"dictionary {name}",
            f"  held-out FVU      {r.get('held_out_fvu', float('nan')):.4f}   "
            f"(explained variance {1 - r.get('held_out_fvu', float('nan')):.4f}, "
            f"{r.get('held_out_tokens', 0):,} held-out tokens)",
            f"  L0                {r.get('held_out_l0', float('nan')):.1f}",
            f"  dead latents      {100 * r['dead_fraction']:.2f}%   (no firing in the last "
            f"{r['dead_window_tokens']:,} tokens; {r['tokens']:,} tokens trained)",
            f"  tokens/s          {rate:,.0f}",
            f"  saved to          {r.get('saelens_uri')}   (SAELens layout)",
            f"  firing plot       {r.get('firing_plot')}",
            f"  MLflow run        {result.child_runs.get(name)}",
        ]
    lines += [f"MLflow job run    {result.mlflow_run_id} (experiment {result.experiment_id})",
              f"open the MLflow UI: {result.mlflow_ui}"]
    return "\n".join(lines)


def command_run(args: argparse.Namespace) -> int:
    try:
        spec = load_job_spec(args.job)
    except JobSpecError as error:
        print(error, file=sys.stderr)
        return 2
    from services.runner import run_job

    show, close = _progress_printer() if not args.quiet else (None, lambda: None)
    try:
        result = run_job(spec, quiet=True, on_progress=show)
    except ValueError as error:  # a rule that needed the model (layer beyond depth, ...)
        close()
        print(f"job rejected: {error}", file=sys.stderr)
        return 2
    close()
    print(summary(result))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="saeforge", description="Train sparse autoencoders on LM activations.")
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="run a job in-process on an embedded local Ray (or RAY_ADDRESS)")
    run.add_argument("job", nargs="?", help="JobSpec YAML/JSON file; none = the embedded default job")
    run.add_argument("--quiet", action="store_true", help="no progress bar")
    run.set_defaults(handler=command_run)
    args = parser.parse_args(argv)
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
