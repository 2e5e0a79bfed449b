"""``servemesh jobs ...``: submit a batch job from a file and follow it; status, results, cancel, list."""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from broker.settings import Settings
from servemesh.client import MeshClient
from servemesh.commands.support import CliError, Parser, command_group
from servemesh.jobs import Job, JobStatus
from servemesh.objects import is_s3, upload

__all__ = ["add_parsers", "run"]


def _status_json(status: JobStatus) -> dict[str, Any]:
    eta = None if status.eta_s is None else round(status.eta_s, 1)
    return {"id": status.id, "model": status.model, "state": status.state, "total": status.total,
            "submitted": status.submitted, "done": status.done, "failed": status.failed,
            "rate": round(status.rate, 2), "eta_s": eta, "error": status.error}  # fmt: skip


async def _follow(job: Job, quiet: bool) -> JobStatus:
    """Wait for the job, with a progress bar on a terminal."""
    if quiet:
        return await job.wait()
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[rate]}"),
               TimeRemainingColumn())  # fmt: skip
    with Progress(*columns) as progress:
        bar = progress.add_task(job.id, total=None, rate="")
        while True:
            status = await job.status()
            progress.update(bar, total=status.total, completed=status.done + status.failed,
                            rate=f"{status.rate:,.0f}/s, {status.failed} failed")  # fmt: skip
            if status.state in ("done", "cancelled", "failed"):
                return status
            await asyncio.sleep(0.5)


async def write_results_to(job: Job, target: str, settings: Settings) -> int:
    """Results to a local .npz, or to ``s3://bucket/key`` by way of a temporary file."""
    if not is_s3(target):
        return await write_results(job, Path(target))
    with tempfile.TemporaryDirectory(prefix="servemesh-") as tmp:
        local = Path(tmp) / "results.npz"
        written = await write_results(job, local)
        await upload(settings, local, target)
    return written


async def write_results(job: Job, path: Path) -> int:
    """Results as an .npz: each output stacked in item order, plus ``failed`` indices and their errors."""
    outputs: dict[str, dict[int, np.ndarray[Any, Any]]] = {}
    failed: dict[int, str] = {}
    async for result in job.results():
        if result.reply is None:
            failed[result.index] = result.error.message if result.error else "unknown"
            continue
        for name, value in result.reply.outputs.items():
            outputs.setdefault(name, {})[result.index] = value[0] if value.ndim and len(value) == 1 else value
    arrays = {name: np.stack([by_index[i] for i in sorted(by_index)]) for name, by_index in outputs.items()}
    arrays |= {f"{name}_index": np.array(sorted(by_index)) for name, by_index in outputs.items()}
    arrays["failed"] = np.array(sorted(failed), dtype=np.int64)
    arrays["failed_error"] = np.array([failed[i] for i in sorted(failed)], dtype=str)
    np.savez(path, **arrays)  # type: ignore[arg-type]
    return sum(len(v) for v in outputs.values()) // max(1, len(outputs))


async def _submit(client: MeshClient, args: argparse.Namespace) -> Any:
    source = args.input if is_s3(args.input) else Path(args.input)
    if not is_s3(args.input) and not Path(args.input).is_file():
        raise CliError(f"--input {args.input}: no such file")
    job = await client.submit_job(args.model, source, priority=args.priority, job_id=args.job_id)
    if args.detach:
        submitted = await job.submitted()
        return {"id": job.id, "submitted": submitted}
    status = await _follow(job, args.json)
    result = _status_json(status)
    if status.state == "failed":
        raise CliError(f"job {job.id} failed: {status.error}")
    if args.output:
        result["written"] = await write_results_to(job, args.output, client.settings)
        result["output"] = args.output
    return result


async def _status(client: MeshClient, args: argparse.Namespace) -> Any:
    return _status_json(await (await client.job(args.id)).status())


async def _results(client: MeshClient, args: argparse.Namespace) -> Any:
    job = await client.job(args.id)
    if args.output:
        return {"written": await write_results_to(job, args.output, client.settings), "output": args.output}
    lines = []
    async for result in job.results(follow=False):
        outputs = {k: v.tolist() for k, v in result.reply.outputs.items()} if result.reply else None
        lines.append({"index": result.index, "outputs": outputs,
                      "error": result.error.to_wire() if result.error else None})  # fmt: skip
    return sorted(lines, key=lambda line: line["index"])


async def _cancel(client: MeshClient, args: argparse.Namespace) -> Any:
    job = await client.job(args.id)
    await job.cancel()
    return _status_json(await job.status())


async def _list(client: MeshClient, args: argparse.Namespace) -> Any:
    """Every job with its state as it is now (done is found from the stored results, not the record)."""
    listed = []
    for job_id in sorted(await client.jobs()):
        status = await (await client.job(job_id)).status()
        listed.append({"id": job_id, "model": status.model, "state": status.state, "total": status.total,
                       "done": status.done, "failed": status.failed})  # fmt: skip
    return listed


_COMMANDS = {"submit": _submit, "status": _status, "results": _results, "cancel": _cancel, "list": _list}


def _print_human(command: str, result: Any) -> None:
    if command == "list":
        print(f"{'JOB':<34} {'MODEL':<20} {'STATE':<11} {'DONE':>8} {'FAILED':>7} {'TOTAL':>8}")
        for job in result:
            total = "?" if job["total"] is None else job["total"]
            print(f"{job['id']:<34} {job['model']:<20} {job['state']:<11} {job['done']:>8} {job['failed']:>7} "
                  f"{total:>8}")  # fmt: skip
    elif command == "results" and isinstance(result, list):
        for line in result:
            what = f"error {line['error']['status']}: {line['error']['message']}" if line["error"] else line["outputs"]
            print(f"{line['index']}: {what}")
    elif "state" in result:
        eta = f", ETA {result['eta_s']:.0f} s" if result.get("eta_s") is not None else ""
        total = "?" if result["total"] is None else result["total"]
        print(f"{result['id']} ({result['model']}): {result['state']}, {result['done']} done, {result['failed']} "
              f"failed of {total}, {result['rate']:g}/s{eta}" + (f"; wrote {result['output']}" if "output" in result
                                                                else ""))  # fmt: skip
    else:
        print(", ".join(f"{k} {v}" for k, v in result.items()))


async def run(args: argparse.Namespace) -> int:
    async with await MeshClient.connect(settings=Settings.from_env(nats_url=args.nats)) as client:
        result = await _COMMANDS[args.jobs_command](client, args)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        _print_human(args.jobs_command, result)
    return 0


def add_parsers(sub: argparse._SubParsersAction, common: Parser) -> None:  # type: ignore[type-arg]
    action = command_group(sub, "jobs", "batch jobs: submit, status, results, cancel, list", common, "jobs_command")
    submit = action("submit", "submit a job and follow it with a progress bar (--json: no bar)")
    submit.add_argument("model")
    submit.add_argument("--input", required=True, help=".npy or .npz file or s3:// URI; its first axis is the items")
    submit.add_argument("--output", help="write the results here (.npz, local or s3://) when the job is done")
    submit.add_argument("--priority", default="low", choices=["high", "normal", "low"], help="the items' queue")
    submit.add_argument("--job-id", help="an id of your own (resubmitting it never duplicates items)")
    submit.add_argument("--detach", action="store_true", help="return once the items are queued")
    action("status", "a job's progress").add_argument("id", help="the job's id")
    results = action("results", "a job's results so far, by item index")
    results.add_argument("id", help="the job's id")
    results.add_argument("--output", help="write them to an .npz (local or s3://) instead of printing")
    action("cancel", "stop a job: its items still queued are dropped").add_argument("id", help="the job's id")
    action("list", "every job and its state")
