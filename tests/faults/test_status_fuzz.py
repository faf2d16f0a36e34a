"""status.json is parsed by `collectord status` (collectord.control.status_lines): arbitrary
and mutated documents must render or be refused, never raise (a traceback in `status`)."""

from __future__ import annotations

import time

from hypothesis import HealthCheck, given, settings

from collectord.control import status_lines
from tests.faults import payloads as P

SAMPLE = {
    "version": 1, "pid": 4242, "started_at": 1795882594.0, "updated_at": 1795882604.0, "config": "/etc/c.conf",
    "dsn": "host=db user=c password=***", "state": "running",
    "children": [
        {"name": "trades.0", "target": "workers.trades:TradesCollector", "state": "RUNNING", "pid": 4250,
         "started_at": 1795882594.2, "uptime": 10.6, "restarts": 0, "last_exit": None, "next_start_in": None,
         "heartbeat_age": 0.4, "counters": {"rows_written": 343, "errors": 0, "last_success": 1795882604.1,
                                            "last_error": None, "tokens": 6}},
        {"name": "prices", "target": "workers.prices:PricesCollector", "state": "BACKOFF", "pid": None,
         "started_at": None, "uptime": None, "restarts": 2, "last_exit": "signal 9", "next_start_in": 3.5,
         "heartbeat_age": None, "counters": {"rows_written": 0, "errors": 4, "last_success": None,
                                             "last_error": "HttpError: gave up\nafter 2"}},
    ],
}


@settings(max_examples=300, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(doc=P.payloads([SAMPLE]))
def test_status_table_never_raises(doc):
    if not isinstance(doc, dict):
        return  # the reader (collectord.status.read_status) drops anything that is not an object
    lines = status_lines(doc, time.time())
    assert lines and all(isinstance(line, str) and "\n" not in line for line in lines)
