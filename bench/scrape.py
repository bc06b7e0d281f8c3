"""Server-side correctness: `trustplane_rpc_calls_total` deltas around each h2load run.

h2load counts HTTP 200 as success even when the gRPC status in the trailers is an error, so the
bench reads the server's own counters before and after a run and requires, for the method under
test, no new non-OK calls and exactly as many new OK calls as h2load completed.
"""

from __future__ import annotations

import asyncio
import urllib.request
from collections import Counter

from prometheus_client.parser import text_string_to_metric_families

SAMPLE = "trustplane_rpc_calls_total"
_TIMEOUT = 5.0

CallCounts = Counter[str]  # status code name -> calls


async def rpc_calls(metrics_url: str, method: str) -> CallCounts:
    """The server's call counts for `method` (a "/package.Service/Method" path), by code."""
    text = await asyncio.to_thread(_fetch, metrics_url)
    return calls_for(text, method)


def _fetch(url: str) -> str:
    with urllib.request.urlopen(url, timeout=_TIMEOUT) as response:
        body: bytes = response.read()
    return body.decode()


def calls_for(exposition: str, method: str) -> CallCounts:
    """Parse a Prometheus text exposition into `method`'s call counts by code."""
    counts: CallCounts = Counter()
    for family in text_string_to_metric_families(exposition):
        for sample in family.samples:
            if sample.name == SAMPLE and sample.labels.get("method") == method:
                counts[sample.labels["code"]] += int(sample.value)
    return counts


def problems(before: CallCounts, after: CallCounts, succeeded: int) -> list[str]:
    """What is wrong with the run between the two scrapes (empty when it was correct)."""
    delta = Counter({code: after[code] - before[code] for code in after})
    found = [
        f"server counted {n} {code} call(s)"
        for code, n in sorted(delta.items())
        if code != "OK" and n != 0
    ]
    if delta["OK"] != succeeded:
        found.append(f"server counted {delta['OK']} OK call(s), h2load completed {succeeded}")
    return found
