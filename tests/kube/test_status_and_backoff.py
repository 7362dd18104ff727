"""The pure parts of the Kubernetes plumbing: when status needs a write, what the patch says, backoff bounds."""

from __future__ import annotations

import random
from datetime import UTC, datetime

from egress_gateway.kube.reflector import Backoff
from egress_gateway.kube.status import Acceptance, needs_write, status_patch

VALID = Acceptance(True, "Valid", "policy is valid and in force", 3)
NOW = datetime(2026, 11, 26, 12, 0, tzinfo=UTC)


def test_a_missing_condition_needs_a_write() -> None:
    assert needs_write(None, VALID)
    assert needs_write({"conditions": []}, VALID)


def test_the_same_condition_for_the_same_generation_needs_no_write() -> None:
    current = status_patch(None, VALID, NOW)["status"]
    assert not needs_write(current, VALID)


def test_a_new_generation_or_a_new_verdict_needs_a_write() -> None:
    current = status_patch(None, VALID, NOW)["status"]
    assert needs_write(current, Acceptance(True, "Valid", "policy is valid and in force", 4))
    assert needs_write(current, Acceptance(False, "Invalid", "spec.rules[0].hosts[0]: bad", 3))


def test_last_transition_time_moves_only_when_the_status_flips() -> None:
    first = status_patch(None, VALID, NOW)["status"]
    later = datetime(2026, 11, 26, 13, 0, tzinfo=UTC)
    same_status = status_patch(first, Acceptance(True, "Valid", "policy is valid and in force", 4), later)
    assert same_status["status"]["conditions"][-1]["lastTransitionTime"] == "2026-11-26T12:00:00Z"
    flipped = status_patch(first, Acceptance(False, "Invalid", "x", 4), later)
    assert flipped["status"]["conditions"][-1]["lastTransitionTime"] == "2026-11-26T13:00:00Z"
    assert flipped["status"]["observedGeneration"] == 4


def test_other_conditions_are_kept_and_messages_are_bounded() -> None:
    current = {"conditions": [{"type": "Programmed", "status": "True"}]}
    patch = status_patch(current, Acceptance(False, "Invalid", "x" * 5000, 1), NOW)
    types = [c["type"] for c in patch["status"]["conditions"]]
    assert types == ["Programmed", "Accepted"]
    assert len(patch["status"]["conditions"][-1]["message"]) == 1024


def test_backoff_grows_with_full_jitter_up_to_the_cap_and_resets() -> None:
    random.seed(3)  # deterministic draws
    backoff = Backoff(base_s=0.2, cap_s=3.0)
    delays = [backoff.next_delay() for _ in range(12)]
    assert all(0.2 <= d <= 3.0 for d in delays)
    assert max(delays[6:]) > 0.8  # the ceiling grew (0.2 * 2**6 is past the cap)
    backoff.reset()
    assert backoff.next_delay() == 0.2
