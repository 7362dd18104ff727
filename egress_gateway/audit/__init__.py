"""Audit adapters: spans, decision log lines, metrics, and the trail reader. Never imported by the engine."""
