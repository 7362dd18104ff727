"""The hot-path audit recorder: spans, the JSON-lines trail, decision log lines. Never imported by the engine.

The offline trail tools live in `egress_gateway/trail/`, metrics in `egress_gateway/metrics.py`. `build_recorder`
imports the OpenTelemetry SDK when called, so that `egress_gateway.audit.recorder` stays cheap to import.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from egress_gateway.audit.spans import SpanRecorder
    from egress_gateway.settings import Settings


def build_recorder(settings: Settings) -> SpanRecorder:
    from egress_gateway.audit.spans import build_recorder as build

    return build(settings)
