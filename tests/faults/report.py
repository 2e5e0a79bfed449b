"""The fault suite's figures: one line per scenario on the terminal, and the latest run of every
scenario in a JSON file that ``python -m tests.faults.report`` turns into the table of docs/faults.md."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

from tests.faults.load import Tally

RESULTS = Path(__file__).resolve().parents[2] / ".servemesh" / "faults-latest.json"
DOC = Path(__file__).resolve().parents[2] / "docs" / "faults.md"
_BEGIN, _END = "<!-- figures:begin -->", "<!-- figures:end -->"
LINES: list[str] = []  # this session's lines, repeated in pytest's terminal summary


def record(scenario: str, tally: Tally, seconds: float, **notes: Any) -> str:
    """Print the scenario's line (whatever pytest captures) and keep its figures for the docs."""
    line = tally.line(scenario)
    if notes:
        line += " | " + ", ".join(f"{k} {v}" for k, v in notes.items())
    LINES.append(line)
    print(f"\n[faults] {line}")  # shown at once with -s; the terminal summary shows it either way
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    results[scenario] = {
        "sent": tally.sent, "answered": tally.answered, "failed": tally.failed_total,
        "failed_by_status": {str(s): n for s, n in sorted(tally.failed.items())}, "lost": tally.lost,
        "wrong": tally.wrong, "redelivered": tally.redelivered, "errors": tally.errors,
        "untyped": tally.untyped[:5], "seconds": round(seconds, 1), "notes": notes,
        "at": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
    }  # fmt: skip
    RESULTS.write_text(json.dumps(results, indent=2, sort_keys=True))
    return line


# The order (#7); scenarios not listed come after.
ORDER = [
    "worker SIGKILL mid-batch", "worker SIGTERM (drain)", "leader router SIGKILL",
    "nats-server restart (SIGTERM, file storage)", "nats-server restart (SIGKILL, file storage)",
    "3-node cluster: stream leader SIGKILL, then back", "S3 down while a model loads",
    "model whose load always fails", "poison request (crashes its worker)",
    "poison request (crashes its worker), 2 instances", "worker SIGSTOP (stalled)",
    "client killed before its replies",
]  # fmt: skip


def table(results: dict[str, Any]) -> str:
    rows = [
        "| scenario | sent | answered | failed (typed, by status) | lost | redelivered | notes |",
        "|---|---|---|---|---|---|---|",
    ]
    rank = {name: i for i, name in enumerate(ORDER)}
    for scenario, r in sorted(results.items(), key=lambda item: rank.get(item[0], len(ORDER))):
        by_status = ", ".join(f"{n}×{s}" for s, n in r["failed_by_status"].items())
        failed = f"{r['failed']} ({by_status})" if by_status else "0"
        notes = "; ".join(f"{k} {v}" for k, v in r["notes"].items())
        figures = f"{r['sent']:,} | {r['answered']:,} | {failed} | {r['lost']} | {r['redelivered']:,}"
        rows.append(f"| {scenario} | {figures} | {notes} |")
    return "\n".join(rows)


def main() -> None:
    """Print the table of the latest figures; with ``--write``, replace the one in docs/faults.md."""
    results = json.loads(RESULTS.read_text())
    text = table(results)
    if "--write" in sys.argv[1:]:
        doc = DOC.read_text()
        head, _, rest = doc.partition(_BEGIN)
        _, _, tail = rest.partition(_END)
        DOC.write_text(f"{head}{_BEGIN}\n{text}\n{_END}{tail}")
    print(text)


if __name__ == "__main__":
    main()
