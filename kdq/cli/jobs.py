"""``kdq jobs list|show|watch|cancel|delete|download|compare|rerun|deliveries``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from ..client import Client
from ..compare import compare_row
from ..errors import KdqError, Refused
from ..models import Job, merge_change, switch_union
from ..progress import JobView
from .common import (
    dump,
    emit,
    human_size,
    number,
    progress_mode,
    service_options,
    set_path,
    spec_arg,
    table,
    when,
)


def _progress(job: Job) -> str:
    if job.finished:
        return job.state
    overall = job.progress.overall
    pct = f" {overall:.0%}" if isinstance(overall, (int, float)) else ""
    return f"{job.state} {job.stage or ''}{pct}".strip()


def cmd_list(args: argparse.Namespace, client: Client) -> int:
    jobs = list(client.jobs(state=args.state, name=args.name, tag=args.tag, teacher=args.teacher,
                            dataset=args.dataset, created_after=args.after, created_before=args.before,
                            limit=args.limit))  # fmt: skip
    teams = {j.team_id for j in jobs}

    def human() -> None:
        rows = [[j.id, j.name, _progress(j), ",".join(j.tags), j.teacher_model_id, when(j.created_at)]
                + ([j.team_id] if len(teams) > 1 else []) for j in jobs]  # fmt: skip
        header = ["id", "name", "state", "tags", "teacher", "created"] + (["team"] if len(teams) > 1 else [])
        table(rows, header)

    emit(args, [dump(j) for j in jobs], human)
    return 0


def _show(job: Job) -> None:
    print(f"{job.id}  {job.name or ''}".rstrip())
    print(f"  state     {_progress(job)}   attempts {job.attempts}   team {job.team_id}")
    print(f"  teacher   {job.teacher_model_id}   dataset {job.dataset_id}")
    if job.tags:
        print(f"  tags      {', '.join(job.tags)}")
    print(f"  created   {when(job.created_at)}   finished {when(job.finished_at)}")
    if job.verdict:
        reasons = "; ".join(f"{r.get('code')}: {r.get('message')}" if isinstance(r, dict) and r.get("code") else
                            str(r.get("detail", r) if isinstance(r, dict) else r) for r in job.verdict.get("reasons", []))
        print(f"  verdict   {job.verdict.get('label') or job.verdict.get('verdict')}" + (f" ({reasons})" if reasons else ""))
    if job.error:
        print(f"  problem   {job.error.title}: {job.error.detail}")
    models = (job.summary or {}).get("models") or {}
    metric = (job.summary or {}).get("metric")
    if models:
        table([[name, number(m.get(metric)), human_size(m.get("size_bytes")), m.get("parameters")]
               for name, m in models.items()], ["  model", metric or "metric", "size", "parameters"])  # fmt: skip


def cmd_show(args: argparse.Namespace, client: Client) -> int:
    job = client.job(args.job_id)
    emit(args, dump(job), lambda: _show(job))
    return 0


def _follow(args: argparse.Namespace, client: Client, job: Job) -> int:
    """Until it ends; a failed job raises `JobFailed` (exit 1, printed by `common.run`)."""
    view = JobView(mode=progress_mode(args), job_id=job.id)  # type: ignore[arg-type]
    done = client.wait(job.id, progress=view)
    emit(args, dump(done), lambda: _show(done))
    return 0


def cmd_delete(args: argparse.Namespace, client: Client) -> int:
    """A finished job's files: all (the job stays, as a record) or one ``--artifact``."""
    if args.artifact:
        client.delete_artifact(args.job_id, args.artifact)
        emit(args, {"job_id": args.job_id, "deleted": args.artifact}, lambda: print(f"{args.job_id} {args.artifact} deleted"))
        return 0
    job = client.delete_job(args.job_id)
    emit(args, dump(job), lambda: print(f"{job.id} {job.state}, files deleted"))
    return 0


def cmd_watch(args: argparse.Namespace, client: Client) -> int:
    return _follow(args, client, client.job(args.job_id))


def cmd_cancel(args: argparse.Namespace, client: Client) -> int:
    try:
        job = client.cancel(args.job_id)
    except Refused as exc:
        if exc.status != 409:
            raise
        job = client.job(args.job_id)
        print(f"kdq jobs cancel: job {job.id} already finished ({job.state})", file=sys.stderr)
    if args.wait and not job.finished:
        job = client.wait(job.id, progress=JobView(mode="quiet"), raise_on_failure=False)
    emit(args, dump(job), lambda: print(f"{job.id} {job.state}"))
    return 0


def cmd_download(args: argparse.Namespace, client: Client) -> int:
    job = client.job(args.job_id)
    if not job.succeeded:
        raise KdqError(f"job {job.id} is {job.state}: only a succeeded job has artifacts")
    paths = client.download(job.id, Path(args.out or f"kdq-{job.id}"), names=args.name or None)
    emit(args, [str(p) for p in paths], lambda: [print(p) for p in paths])
    return 0


def cmd_compare(args: argparse.Namespace, client: Client) -> int:
    if not 2 <= len(args.job_ids) <= 4:
        raise KdqError("compare 2 to 4 jobs")
    rows = []
    for ident in args.job_ids:
        job = client.job(ident)
        rows.append(compare_row(job, client.metrics(ident) if job.succeeded else None))

    def human() -> None:
        table([[r["job_id"], r.get("name"), r["state"], r.get("model"),
                f"{r.get('metric') or '-'} {number(r.get('value'))}", human_size(r.get("size_bytes")),
                number(r.get("latency_p50_ms")), r.get("verdict")] for r in rows],
              ["job", "name", "state", "model", "metric", "size", "p50 ms", "verdict"])  # fmt: skip

    emit(args, rows, human)
    return 0


def cmd_rerun(args: argparse.Namespace, client: Client) -> int:
    """Submit a job again with changes: ``--set distillation.epochs=5``, ``--spec`` (merged)."""
    old = client.job(args.job_id)
    body: dict[str, Any] = old.resubmittable()
    for key, value in spec_arg(args.spec).items():
        merge_change(body, key, value)
    before = old.resubmittable()
    for pair in args.set:
        path, sep, raw = pair.partition("=")
        if not sep:
            raise KdqError(f"--set {pair!r}: expected FIELD.PATH=VALUE")
        set_path(body, path, raw)
        switch_union(body, path, before)
    if args.name:
        body["name"] = args.name
    job = client.submit(body)
    if not args.quiet:
        print(f"kdq jobs rerun: {old.id} submitted again as {job.id}", file=sys.stderr)
    if args.wait:
        return _follow(args, client, job)
    emit(args, dump(job), lambda: print(job.id))
    return 0


def cmd_deliveries(args: argparse.Namespace, client: Client) -> int:
    items = client.deliveries(args.job_id)

    def human() -> None:
        for d in items:
            print(f"{d.id}  {d.state}  {d.event}  {d.url}")
            for a in d.attempts:
                print(f"    {a.get('at')}  {a.get('status') or '-'}  {a.get('error') or 'ok'}  {a.get('duration_ms')} ms")

    emit(args, [dump(d) for d in items], human)
    return 0


def add_parser(sub: Any) -> None:
    jobs = sub.add_parser("jobs", help="list, show, watch, cancel, delete, download, compare, rerun jobs")
    js = jobs.add_subparsers(dest="jobs_command", required=True)
    common = service_options()

    p = js.add_parser("list", parents=[common], help="jobs, newest first")
    p.add_argument("--state", action="append", help="QUEUED, RUNNING, SUCCEEDED, … (repeatable)")
    p.add_argument("--name", help="names starting with this")
    p.add_argument("--tag", action="append", help="has this tag (repeatable: all of them)")
    p.add_argument("--teacher", help="the teacher's model id (mdl_…)")
    p.add_argument("--dataset", help="the dataset's id (ds_…)")
    p.add_argument("--after", help="created at or after (ISO 8601 with a zone, e.g. 2026-12-01T00:00Z)")
    p.add_argument("--before", help="created before (ISO 8601 with a zone)")
    p.add_argument("--limit", type=int, default=20, help="at most this many (default 20)")
    p.set_defaults(handler=cmd_list)

    for name, handler, text in (("show", cmd_show, "one job: state, verdict, metrics, problem"),
                                ("watch", cmd_watch, "follow a job until it ends (exit 1 unless it succeeded)"),
                                ("deliveries", cmd_deliveries, "a job's webhook deliveries and their attempts")):  # fmt: skip
        p = js.add_parser(name, parents=[common], help=text)
        p.add_argument("job_id")
        p.add_argument("--progress", choices=["auto", "bar", "lines"], default="auto", help=argparse.SUPPRESS)
        p.set_defaults(handler=handler)

    p = js.add_parser("cancel", parents=[common], help="cancel a job")
    p.add_argument("job_id")
    p.add_argument("--wait", action="store_true", help="until it has stopped")
    p.set_defaults(handler=cmd_cancel)

    p = js.add_parser("delete", parents=[common], help="delete a finished job's files (it stays as a record)")
    p.add_argument("job_id")
    p.add_argument("--artifact", metavar="NAME", help="only this file")
    p.set_defaults(handler=cmd_delete)

    p = js.add_parser("download", parents=[common], help="a succeeded job's files, checked against their sha256")
    p.add_argument("job_id")
    p.add_argument("--out", help="the folder (default ./kdq-<job id>)")
    p.add_argument("--name", action="append", help="only this artifact (repeatable)")
    p.set_defaults(handler=cmd_download)

    p = js.add_parser("compare", parents=[common], help="2 to 4 jobs side by side: metric, size, latency")
    p.add_argument("job_ids", nargs="+", metavar="JOB_ID")
    p.set_defaults(handler=cmd_compare)

    p = js.add_parser("rerun", parents=[common], help="submit a job again, with changes")
    p.add_argument("job_id")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="change one field: distillation.epochs=5, quantization.method=\"dynamic_int8\" (repeatable)")
    p.add_argument("--spec", help="fields to merge in, as JSON or a JSON file")
    p.add_argument("--name", help="the new job's name")
    p.add_argument("--wait", action="store_true", help="follow the new job until it ends")
    p.add_argument("--progress", choices=["auto", "bar", "lines"], default="auto", help=argparse.SUPPRESS)
    p.set_defaults(handler=cmd_rerun)
