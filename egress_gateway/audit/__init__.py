"""The hot-path audit recorder: spans, the JSON-lines trail, decision log lines. Never imported by the engine.

The offline trail tools live in `egress_gateway/trail/`, metrics in `egress_gateway/metrics.py`.

`build_recorder(settings)` is the one entry point the gateway needs: it opens the exporters configured under
`audit:` (a bad trail path fails here, at startup, with a clear error) and returns the `Recorder` the proxy
uses. The OpenTelemetry SDK is imported lazily so that `egress_gateway.audit.recorder` stays cheap to import.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from egress_gateway.audit.spans import SpanRecorder
    from egress_gateway.settings import Settings


def build_recorder(settings: Settings) -> SpanRecorder:
    from egress_gateway.audit.snapshot import decision_config
    from egress_gateway.audit.spans import build_recorder as build

    recorder = build(settings.audit)
    recorder.config = decision_config(settings)
    recorder.annotation_keys = tuple(settings.audit.policy_annotations)
    return recorder
