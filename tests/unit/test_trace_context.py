"""The worker's direct traceparent reading gives the same parent as the W3C propagator, and the
not-sampled check reads only the sampled bit."""

from __future__ import annotations

import pytest
from opentelemetry import trace
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from broker import tracing

TP = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-"
CASES = [
    {"traceparent": TP + "01"},
    {"traceparent": TP + "03", "tracestate": "a=1,b=2"},
    {"traceparent": TP + "00"},
    {"traceparent": TP.upper() + "01"},
    {"traceparent": "00-0AF7651916CD43DD8448EB211C80319C-b7ad6b7169203331-01"},  # W3C: lower case only
    {"traceparent": "00-0af7651916cd43dd8448eb211c80319c-B7AD6B7169203331-01"},
    {"traceparent": TP + "0b"},
    {"traceparent": TP + "0B"},
    {"traceparent": "00-00000000000000000000000000000000-b7ad6b7169203331-01"},
    {"traceparent": "00-0af7651916cd43dd8448eb211c80319c-0000000000000000-01"},
    {"traceparent": "ff-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"},
    {"traceparent": "00-0af7651916cd43dd8448eb211c80319c_b7ad6b7169203331-01"},
    {"traceparent": "junk"},
    {"traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b71692_3331-01"},
    {"traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-+1"},
    {"traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331- 1"},
    {},
]


@pytest.mark.parametrize("headers", CASES)
def test_same_parent_as_the_propagator(headers: dict[str, str]) -> None:
    ours = trace.get_current_span(tracing._parent_context(headers)).get_span_context()
    theirs = trace.get_current_span(TraceContextTextMapPropagator().extract(headers)).get_span_context()
    assert ours == theirs and ours.trace_state == theirs.trace_state


@pytest.mark.parametrize(
    ("traceparent", "dropped"),
    [(TP + "00", True), (TP + "02", True), (TP + "01", False), (TP + "03", False), ("junk", False), (None, False)],
)
def test_not_sampled_reads_the_sampled_bit(traceparent: str | None, dropped: bool) -> None:
    assert tracing._not_sampled(traceparent) is dropped
