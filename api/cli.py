"""The `saeforge` command line. Heavy modules (torch, ray) are imported inside the commands that need them."""

from __future__ import annotations

import argparse
import sys

from api.jobspec import JobSpecError, load_job_spec, parse_job_spec, read_job_spec_file


def _progress_printer():
    from tqdm import tqdm

    bar: dict = {}

    def show(progress) -> None:
        phase = getattr(progress, "phase", "training")
        if bar.get("phase") != phase:  # training, then analysis: a bar each
            if "bar" in bar:
                bar["bar"].close()
            bar["bar"] = tqdm(total=progress.tokens_total, unit="tok", unit_scale=True, desc=phase,
                              dynamic_ncols=True)
            bar["phase"] = phase
        b = bar["bar"]
        if b.total != progress.tokens_total:  # the analysis' slice ended before analysis.tokens
            b.total = progress.tokens_total
        b.update(progress.tokens_done - b.n)
        if phase != "training":
            b.refresh()
            return
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
        window = r["dead_window_tokens"]
        if r.get("dead_window_complete", r["tokens"] >= window):
            dead = (f"{100 * r['dead_fraction']:.2f}%   (no firing in the last {window:,} of the "
                    f"{r['tokens']:,} tokens trained)")
        else:  # no latent can be dead before one whole window: say so rather than print 0%
            dead = f"not measured   (the dead window, {window:,} tokens, is longer than this run's {r['tokens']:,})"
        lines += [
            f"dictionary {name}",
            f"  held-out FVU      {r.get('held_out_fvu', float('nan')):.4f}   "
            f"(explained variance {1 - r.get('held_out_fvu', float('nan')):.4f}, "
            f"{r.get('held_out_tokens', 0):,} held-out tokens)",
            f"  L0                {r.get('held_out_l0', float('nan')):.1f}",
            f"  delta LM loss     {r.get('delta_lm_loss', float('nan')):.4f} nats   (CE loss recovered "
            f"{r.get('ce_loss_recovered', float('nan')):.3f}; clean CE {r.get('ce_clean', float('nan')):.3f})",
            f"  dead latents      {dead}; never fired: {100 * r['never_fired_fraction']:.2f}%",
            f"  tokens/s          {rate:,.0f}",
            f"  saved to          {r.get('saelens_uri')}   (SAELens layout)",
            f"  firing plot       {r.get('firing_plot')}",
            f"  MLflow run        {result.child_runs.get(name)}",
        ]
        if r.get("analysis_uri"):
            lines.append(f"  analysis          {r['analysis_uri']}   (latent pages: `saeforge serve`, then "
                         f"/jobs/{result.job_id}/dictionaries/{name})")
    lines += [f"MLflow job run    {result.mlflow_run_id} (experiment {result.experiment_id})",
              f"open the MLflow UI: {result.mlflow_ui}"]
    return "\n".join(lines)


def command_run(args: argparse.Namespace) -> int:
    try:
        if args.spec_json is not None:
            if args.job is not None:
                raise JobSpecError("give either a job spec file or --spec-json, not both")
            import json

            try:
                data = json.loads(args.spec_json)
            except json.JSONDecodeError as error:
                raise JobSpecError(f"--spec-json: not valid JSON: {error}") from None
            if not isinstance(data, dict):
                raise JobSpecError("--spec-json: the top level must be a mapping of fields")
            spec = parse_job_spec(data)
        else:
            spec = load_job_spec(args.job)
    except JobSpecError as error:
        print(error, file=sys.stderr)
        return 2
    if args.plan:
        from services.placement import PlacementError, nodes_for, plan

        try:
            print(plan(spec, nodes_for(spec, args.gpus)).describe())
        except PlacementError as error:
            print(f"job rejected: {error}", file=sys.stderr)
            return 2
        return 0
    from api.capacity import check_local_run

    try:  # what the service refuses at submission (model rules known without loading it, memory per rank)
        check_local_run(spec)
    except ValueError as error:
        print(f"job rejected: {error}", file=sys.stderr)
        return 2
    from services.runner import run_job

    show, close = _progress_printer() if not args.quiet else (None, lambda: None)
    try:
        result = run_job(spec, job_id=args.job_id, quiet=True, on_progress=show, resume=args.resume,
                         stop_at_step=args.stop_at_step)
    except ValueError as error:  # a rule that needed the model (layer beyond depth, ...)
        close()
        print(f"job rejected: {error}", file=sys.stderr)
        return 2
    close()
    if result.stopped_at is not None:
        print(f"job {result.job_id} checkpointed at step {result.stopped_at['step']:,} "
              f"({result.stopped_at['tokens']:,} tokens) and stopped; continue it with "
              f"`saeforge run JOB --resume --job-id {result.job_id}`")
        return 0
    print(summary(result))
    return 0


def command_analyze(args: argparse.Namespace) -> int:
    """Analyse a finished job's dictionaries (services/analysis.py): JOB is a job id under $SAEFORGE_HOME or the
    job's output folder / URI (it holds the job.yaml the job ran with)."""
    from pathlib import Path

    import yaml

    from services.analysis import analyze_job
    from services.runner import service_home
    from storage.uri import filesystem, join

    output = args.job if "://" in args.job or Path(args.job).is_dir() else str(service_home() / args.job)
    fs, path = filesystem(output)
    try:
        with fs.open(join(path, "job.yaml")) as f:
            data = yaml.safe_load(f)
    except FileNotFoundError:
        print(f"saeforge analyze: no job.yaml under {output}; give a job id under $SAEFORGE_HOME "
              f"({service_home()}) or the job's output folder or URI", file=sys.stderr)
        return 2
    if args.tokens is not None:
        data.setdefault("analysis", {})["tokens"] = args.tokens
    try:
        spec = parse_job_spec(data)
    except JobSpecError as error:
        print(error, file=sys.stderr)
        return 2
    on_progress, close = None, lambda: None
    if not args.quiet:  # the bar `saeforge run` shows for its analysis phase
        from services.runner import Progress

        show, close = _progress_printer()

        def on_progress(done: int, total: int) -> None:
            show(Progress(done, total, 0.0, {}, phase="analysis"))

    try:
        manifests = analyze_job(spec, output, names=args.dictionary, on_progress=on_progress)
    except (ValueError, FileNotFoundError) as error:
        print(f"saeforge analyze: {error}", file=sys.stderr)
        return 2
    finally:
        close()
    job_id = Path(path).name
    for name, m in manifests.items():
        print(f"dictionary {name}: {m['tokens']:,} tokens, {m['latents']:,} latents analysed in {m['seconds']:.1f} s "
              f"-> {join(output, 'analysis', name)}   (pages: /jobs/{job_id}/dictionaries/{name})")
    return 0


# --- the service and its client ------------------------------------------------------------------------------
def command_serve(args: argparse.Namespace) -> int:
    from api.app import serve
    from api.settings import Settings, SettingsError

    if args.stop_local_ray:
        from api.rayjobs import stop_local_ray

        home = Settings.from_env().home
        print("stopped the local Ray" if stop_local_ray(home) else f"no local Ray of {home} was running")
        return 0
    try:
        serve(args.host, args.port, args.log_level)
    except SettingsError as error:
        print(f"saeforge serve: {error}", file=sys.stderr)
        return 2
    return 0


def _client(args: argparse.Namespace):
    from api.client import Client

    return Client(args.api_url, args.token)


def _when(value: str | None) -> str:
    return value.replace("T", " ")[:19] if value else "-"


def _show_job(job: dict) -> str:
    p = job.get("progress") or {}
    lines = [f"job        {job['id']}  ({job['name']}, owner {job['owner']})",
             f"state      {job['state']}" + ("  (cancel requested)" if job.get("cancel_requested") and
                                             job["state"] == "running" else ""),
             f"created    {_when(job['created_at'])}   started {_when(job.get('started_at'))}   "
             f"finished {_when(job.get('finished_at'))}"]
    if p:
        rate = f"{p['tokens_per_s']:,.0f} tok/s" if p.get("tokens_per_s") else "- tok/s"
        eta = f", ETA {p['eta_s']:,.0f} s" if p.get("eta_s") is not None else ""
        lines.append(f"progress   {p['tokens_done']:,} / {p['tokens_total']:,} tokens ({100 * p['fraction']:.0f}%), "
                     f"{rate}{eta}")
    if job.get("message"):
        lines.append(f"message    {job['message']}")
    if job.get("output_uri"):
        lines.append(f"output     {job['output_uri']}")
    if job.get("mlflow"):
        lines.append(f"MLflow     run {job['mlflow']['run_id']} ({job['mlflow']['run_status']})  "
                     f"{job['mlflow']['run_url']}")
    for d in job.get("dictionaries", []):
        m = d["metrics"]
        fvu = m.get("final_held_out_fvu", m.get("fvu"))
        l0 = m.get("final_held_out_l0", m.get("l0"))
        dead = m.get("final_dead_fraction", m.get("dead_fraction"))
        parts = [f"FVU {fvu:.4f}" if fvu is not None else None, f"L0 {l0:.1f}" if l0 is not None else None,
                 f"dead {100 * dead:.2f}%" if dead is not None else None]
        lines.append(f"dictionary {d['name']}: " + ", ".join(x for x in parts if x) + f"  run {d['run_id']}")
        if d.get("output_uri"):
            lines.append(f"           saved to {d['output_uri']}")
        if "analysis_fraction" in m:  # the analysis stage's progress, then its pages
            done = m["analysis_fraction"] >= 1 and d.get("tags", {}).get("saeforge.analysis_uri")
            lines.append(f"           latents  /jobs/{job['id']}/dictionaries/{d['name']}" if done else
                         f"           analysis {100 * m['analysis_fraction']:.0f}%")
    return "\n".join(lines)


def _api_call(args: argparse.Namespace, action):
    from api.client import ApiError

    client = _client(args)
    try:
        return action(client)
    except ApiError as error:
        print(f"saeforge {args.command}: {error}", file=sys.stderr)
        return None
    finally:
        client.close()


def _watch(client, job_id: str, poll: float) -> dict:
    from tqdm import tqdm

    bar = None

    def update(job: dict) -> None:
        nonlocal bar
        p = job.get("progress") or {}
        if bar is None:
            bar = tqdm(total=p.get("tokens_total") or None, unit="tok", unit_scale=True, desc=job["id"],
                       dynamic_ncols=True)
        bar.update(max(p.get("tokens_done", 0) - bar.n, 0))
        first = (job.get("dictionaries") or [{}])[0].get("metrics", {})
        postfix = {"state": job["state"]}
        if p.get("tokens_per_s"):
            postfix["tok/s"] = f"{p['tokens_per_s']:,.0f}"
        if "fvu" in first:
            postfix["FVU"] = f"{first['fvu']:.3f}"
        if "l0" in first:
            postfix["L0"] = f"{first['l0']:.1f}"
        bar.set_postfix(postfix, refresh=True)

    try:
        return client.wait(job_id, poll=poll, on_update=update)
    finally:
        if bar is not None:
            bar.close()


def command_submit(args: argparse.Namespace) -> int:
    try:
        data = read_job_spec_file(args.job) if args.job else {}
    except JobSpecError as error:
        print(error, file=sys.stderr)
        return 2

    def submit(client):
        job = client.submit(data)
        print(job["id"])
        if args.watch:
            job = _watch(client, job["id"], args.poll)
            print(_show_job(job))
            return 0 if job["state"] == "succeeded" else 1
        return 0

    result = _api_call(args, submit)
    return 2 if result is None else result


def command_jobs(args: argparse.Namespace) -> int:
    def jobs(client):
        listing = client.jobs(args.state, limit=args.limit)
        rows = [("ID", "STATE", "EXPERIMENT", "CREATED", "MESSAGE")]
        rows += [(j["id"], j["state"], j["experiment"], _when(j["created_at"]), (j.get("message") or "")[:60])
                 for j in listing["items"]]
        widths = [max(len(r[i]) for r in rows) for i in range(4)]
        for r in rows:
            print("  ".join(c.ljust(w) for c, w in zip(r[:4], widths, strict=True)) + "  " + r[4])
        if listing["total"] > len(listing["items"]):
            print(f"({len(listing['items'])} of {listing['total']}; --limit to see more)")
        return 0

    result = _api_call(args, jobs)
    return 2 if result is None else result


def command_status(args: argparse.Namespace) -> int:
    def status(client):
        if args.watch:
            job = _watch(client, args.id, args.poll)
        else:
            job = client.job(args.id)
        if args.json:
            import json

            print(json.dumps(job, indent=2))
        else:
            print(_show_job(job))
        return 0 if not args.watch or job["state"] == "succeeded" else 1

    result = _api_call(args, status)
    return 2 if result is None else result


def command_cancel(args: argparse.Namespace) -> int:
    def cancel(client):
        job = client.cancel(args.id)
        print(f"{job['id']}: {job['state']}" + (" (stopping)" if job["state"] == "running" else ""))
        return 0

    result = _api_call(args, cancel)
    return 2 if result is None else result


def command_logs(args: argparse.Namespace) -> int:
    def logs(client):
        print(client.logs(args.id, args.tail)["logs"])
        return 0

    result = _api_call(args, logs)
    return 2 if result is None else result


def command_compare(args: argparse.Namespace) -> int:
    from services.compare import format_table

    def compare(client):
        result = client.compare(args.experiment, args.job)
        print(format_table(result["rows"]))
        print(f"{len(result['rows'])} dictionaries; Pareto plot ({result['points']} points) logged to MLflow run "
              f"{result['plot_run_id']} as {result['plot_artifact']}")
        if args.plot:
            from pathlib import Path

            Path(args.plot).write_bytes(client.compare_plot(args.experiment, args.job))
            print(f"plot saved to {args.plot}")
        return 0

    result = _api_call(args, compare)
    return 2 if result is None else result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="saeforge", description="Train sparse autoencoders on LM activations.")
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="run a job in-process on an embedded local Ray (or RAY_ADDRESS)")
    run.add_argument("job", nargs="?", help="JobSpec YAML/JSON file; none = the embedded default job")
    run.add_argument("--quiet", action="store_true", help="no progress bar")
    run.add_argument("--job-id", help="the job's id (default: <name>-<time>-<random>); the service passes its own")
    run.add_argument("--resume", action="store_const", const="yes", default="no",
                     help="continue the job --job-id (or the spec's output.uri) from its latest checkpoint; the "
                          "spec may change cluster.trainer_ranks / latent_shards (the dictionary is re-sharded)")
    run.add_argument("--resume-if-checkpointed", dest="resume", action="store_const", const="auto",
                     help="resume when the job has a checkpoint, else start it (what the service uses)")
    run.add_argument("--stop-at-step", type=int, help="checkpoint at this step and stop (resume later)")
    run.add_argument("--spec-json", help="the JobSpec as a JSON string instead of a file (used by the service)")
    run.add_argument("--plan", action="store_true",
                     help="print where the job's actors would run (GPUs, CPUs, pools) on this machine or the "
                          "spec's / RAY_ADDRESS cluster, and exit")
    run.add_argument("--gpus", type=int, help="with --plan: plan for one node with this many GPUs instead")
    run.set_defaults(handler=command_run)

    analyze = commands.add_parser("analyze", help="analyse a finished job's dictionaries (latent pages, Parquet)")
    analyze.add_argument("job", help="job id under $SAEFORGE_HOME, or the job's output folder / URI")
    analyze.add_argument("--dictionary", action="append", help="only this dictionary (repeatable)")
    analyze.add_argument("--tokens", type=int, help="held-out tokens to stream (default: the job's analysis.tokens)")
    analyze.add_argument("--quiet", action="store_true", help="no progress bar")
    analyze.set_defaults(handler=command_analyze)

    serve = commands.add_parser("serve", help="run the job service (HTTP API); see docs/service.md")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    serve.add_argument("--stop-local-ray", action="store_true",
                       help="stop the embedded Ray that `serve` started for $SAEFORGE_HOME (it outlives the API), "
                            "then exit")
    serve.set_defaults(handler=command_serve)

    api = argparse.ArgumentParser(add_help=False)
    api.add_argument("--api-url", help="the service's URL (default: SAEFORGE_API_URL or http://127.0.0.1:8000)")
    api.add_argument("--token", help="bearer token (default: SAEFORGE_API_TOKEN)")
    states = ["queued", "running", "succeeded", "failed", "cancelled"]

    submit = commands.add_parser("submit", parents=[api], help="submit a job to the service")
    submit.add_argument("job", nargs="?", help="JobSpec YAML/JSON file; none = the embedded default job")
    submit.add_argument("--watch", action="store_true", help="show a progress bar until the job ends")
    submit.add_argument("--poll", type=float, default=2.0, help="seconds between updates with --watch")
    submit.set_defaults(handler=command_submit)

    jobs = commands.add_parser("jobs", parents=[api], help="list your jobs, newest first")
    jobs.add_argument("--state", action="append", choices=states, help="only jobs in this state (repeatable)")
    jobs.add_argument("--limit", type=int, default=50)
    jobs.set_defaults(handler=command_jobs)

    status = commands.add_parser("status", parents=[api], help="a job's state, progress, metrics and outputs")
    status.add_argument("id")
    status.add_argument("--watch", action="store_true", help="live progress bar until the job ends")
    status.add_argument("--poll", type=float, default=2.0, help="seconds between updates with --watch")
    status.add_argument("--json", action="store_true", help="the full JSON document")
    status.set_defaults(handler=command_status)

    cancel = commands.add_parser("cancel", parents=[api], help="cancel a job (its checkpoints are kept)")
    cancel.add_argument("id")
    cancel.set_defaults(handler=command_cancel)

    logs = commands.add_parser("logs", parents=[api], help="the job's driver log")
    logs.add_argument("id")
    logs.add_argument("--tail", type=int, default=200, help="last lines (default 200)")
    logs.set_defaults(handler=command_logs)

    compare = commands.add_parser("compare", parents=[api], help="compare an experiment's dictionaries")
    compare.add_argument("--experiment", required=True, help="MLflow experiment (the JobSpec's tracking.experiment)")
    compare.add_argument("--job", help="only this job's dictionaries")
    compare.add_argument("--plot", help="also save the Pareto plot (PNG) here")
    compare.set_defaults(handler=command_compare)
    args = parser.parse_args(argv)
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
