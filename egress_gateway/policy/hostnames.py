"""Host names and host patterns: the one place where names are normalized and the wildcard grammar lives.

Owns: `normalize_name` (case, trailing dot, IDN -> A-labels, length limits) and `HostPattern` (exact names,
`*` = exactly one label, leading `**` = one or more labels). Pure: imports nothing from the rest of the package
except `errors`, and never does I/O.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

import idna

from egress_gateway.policy.errors import InvalidName

MAX_NAME_LENGTH = 253
MAX_LABEL_LENGTH = 63
# Letters, digits, hyphen, and underscore (seen in real service names such as `_dmarc` or SRV-style names).
_LABEL_RE = re.compile(r"^[a-z0-9_](?:[a-z0-9_-]*[a-z0-9_])?$")
_ASCII_RE = re.compile(r"^[\x21-\x7e]+$")


def _to_ascii(name: str) -> str:
    """Lower-case ASCII form of a name; non-ASCII (IDN) names become A-labels (punycode)."""
    if _ASCII_RE.match(name):
        return name.lower()
    try:
        return idna.encode(name, uts46=True).decode("ascii").lower()
    except idna.IDNAError as exc:
        raise InvalidName(f"{name!r} is not a valid internationalized domain name ({exc})") from None


def _check_label(label: str, name: str) -> None:
    if not label:
        raise InvalidName(f"{name!r} has an empty label")
    if len(label) > MAX_LABEL_LENGTH:
        raise InvalidName(f"{name!r} has a label longer than {MAX_LABEL_LENGTH} characters")
    if not _LABEL_RE.match(label):
        raise InvalidName(
            f"{name!r} has an invalid label {label!r} (letters, digits, '-' and '_' only; no leading or trailing '-')"
        )


def looks_like_ip(value: str) -> bool:
    """True for IPv6 literals (with or without brackets) and dotted IPv4 literals."""
    candidate = value.strip("[]")
    try:
        ipaddress.ip_address(candidate)
    except ValueError:
        return False
    return True


def normalize_name(name: str) -> str:
    """Canonical form of a DNS name: lower case, no trailing dot, A-labels. Raises `InvalidName`."""
    if not name:
        raise InvalidName("empty name")
    if name.endswith(".") and not name.endswith(".."):
        name = name[:-1]
    ascii_name = _to_ascii(name)
    if len(ascii_name) > MAX_NAME_LENGTH:
        raise InvalidName(f"name is longer than {MAX_NAME_LENGTH} characters")
    for label in ascii_name.split("."):
        _check_label(label, name)
    return ascii_name


@dataclass(frozen=True, slots=True)
class HostPattern:
    """A compiled entry of a rule's `hosts` list.

    `labels` are stored left to right as written (normalized). `*` stands for exactly one label; a leading `**`
    for one or more labels.
    """

    text: str
    labels: tuple[str, ...]

    @property
    def is_exact(self) -> bool:
        return "*" not in self.labels and "**" not in self.labels

    @property
    def multi_label(self) -> bool:
        return bool(self.labels) and self.labels[0] == "**"

    def matches(self, name: str) -> bool:
        """Reference matcher (linear); the engine uses `HostIndex` instead. `name` must be normalized."""
        name_labels = name.split(".")
        pattern = self.labels
        if self.multi_label:
            suffix = pattern[1:]
            if len(name_labels) <= len(suffix):
                return False
            name_labels = name_labels[len(name_labels) - len(suffix) :]
            pattern = suffix
        elif len(name_labels) != len(pattern):
            return False
        return all(p == "*" or p == n for p, n in zip(pattern, name_labels, strict=True))


def parse_host_pattern(text: str) -> HostPattern:
    """Validate and normalize one `hosts` entry. Raises `InvalidName` with a message that says how to fix it."""
    raw = text.strip()
    if not raw:
        raise InvalidName("empty host pattern")
    if looks_like_ip(raw) or _looks_like_cidr(raw):
        raise InvalidName(f"{text!r} is an IP address; list addresses under `cidrs` (e.g. {raw.strip('[]')}/32)")
    if raw in ("*", "**"):
        raise InvalidName(f"{text!r} matches every name; list the domains you mean (e.g. '*.example.com')")
    if raw.endswith(".") and not raw.endswith(".."):
        raw = raw[:-1]
    parts = raw.split(".")
    if len(parts) < 2:
        raise InvalidName(f"{text!r} is a single label; use a fully qualified name such as 'api.example.com'")
    labels: list[str] = []
    for index, part in enumerate(parts):
        if part in ("*", "**"):
            if index == len(parts) - 1:
                raise InvalidName(f"{text!r} has a wildcard in the last label (TLD); name the domain explicitly")
            if part == "**" and index != 0:
                raise InvalidName(f"{text!r}: '**' is allowed only as the leftmost label (e.g. '**.example.com')")
            labels.append(part)
            continue
        if "*" in part:
            raise InvalidName(
                f"{text!r} has a partial-label wildcard {part!r}; '*' must be a whole label (e.g. '*.example.com')"
            )
        labels.append(part)
    if sum(1 for label in labels if label not in ("*", "**")) < 2 and labels[0] in ("*", "**"):
        raise InvalidName(f"{text!r} covers a whole top-level domain; name the domain (e.g. '*.example.com')")
    concrete = ".".join("a" if label in ("*", "**") else label for label in labels)
    normalized = normalize_name(concrete)  # validates IDN, label syntax and lengths
    normalized_labels = normalized.split(".")
    if len(normalized_labels) != len(labels):
        raise InvalidName(f"{text!r} changes its label count when normalized; write it in A-label (punycode) form")
    final = tuple(original if original in ("*", "**") else normalized_labels[i] for i, original in enumerate(labels))
    return HostPattern(text=".".join(final), labels=final)


def _looks_like_cidr(value: str) -> bool:
    if "/" not in value:
        return False
    try:
        ipaddress.ip_network(value, strict=False)
    except ValueError:
        return False
    return True
