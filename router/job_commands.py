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

from broker.client import MeshClient
from broker.jobs import Job, JobStatus
from broker.objects import is_s3, upload
from broker.settings import Settings
from router.cli_support import add_common_flags

__all__ = ["add_parsers", "run"]


def _status_json(status: JobStatus) -> dict[str, Any]:
    eta = None if status.eta_s is None else round(status.eta_s, 1)
    return {"id": status.id, "model": status.model, "state": status.state, "total": status.total,
            "submitted": status.submitted, "done": status.done, "failed": status.failed,
            "rate": round(status.rate, 2), "eta_s": eta}  # fmt: skip


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
            if status.state in ("done", "cancelled"):
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
    job = await client.submit_job(args.model, source, priority=args.priority, job_id=args.job_id)
    if args.detach:
        submitted = await job.submitted()
        return {"id": job.id, "submitted": submitted}
    status = await _follow(job, args.json)
    result = _status_json(status)
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
    return [{"id": job_id, "model": record["model"], "state": record["state"], "total": record.get("total")}
            for job_id, record in sorted((await client.jobs()).items())]  # fmt: skip


_COMMANDS = {"submit": _submit, "status": _status, "results": _results, "cancel": _cancel, "list": _list}


async def run(args: argparse.Namespace) -> int:
    async with await MeshClient.connect(settings=Settings.from_env(nats_url=args.nats)) as client:
        result = await _COMMANDS[args.jobs_command](client, args)
    print(json.dumps(result, indent=2 if args.json else None))
    return 0


def add_parsers(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    jobs = sub.add_parser("jobs", help="batch jobs: submit, status, results, cancel, list")
    jsub = jobs.add_subparsers(dest="jobs_command", required=True)
    submit = jsub.add_parser("submit", help="submit a job and follow it with a progress bar")
    submit.add_argument("model")
    submit.add_argument("--input", required=True, help=".npy or .npz file or s3:// URI; its first axis is the items")
    submit.add_argument("--output", help="write the results here (.npz, local or s3://) when the job is done")
    submit.add_argument("--priority", default="low", choices=["high", "normal", "low"])
    submit.add_argument("--job-id", help="an id of your own (resubmitting it never duplicates items)")
    submit.add_argument("--detach", action="store_true", help="return once the items are queued")
    for verb in ("status", "results", "cancel"):
        parser = jsub.add_parser(verb)
        parser.add_argument("id")
    jsub.choices["results"].add_argument("--output", help="write them to an .npz instead of printing")
    jsub.add_parser("list")
    add_common_flags(jsub.choices.values())  # --json also turns the progress bar off
