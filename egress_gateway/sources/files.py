"""Policy source: YAML files in a directory (the embedded default when there is no cluster).

Owns: parsing policy YAML (multi-document) into validated objects with errors located by file, document index and
field path (`load_text`, `load_directory`), and `FilePolicySource`, which loads a directory into a `PolicyStore` and
watches it. A file is the unit of change: a valid file replaces its objects atomically; an invalid one is reported
and the previous good version of its objects stays in force. Imports the policy core and structlog only.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog
import yaml

from egress_gateway import metrics
from egress_gateway.policy.errors import FieldError, PolicyValidationError
from egress_gateway.policy.model import KINDS
from egress_gateway.policy.store import ObjectKey, PolicyStore, Versioned, object_key
from egress_gateway.policy.validation import validate_object

POLICY_SUFFIXES = (".yaml", ".yml")
# libyaml's safe loader when PyYAML was built with it (about 9x faster on large policy sets), else pure Python.
_YAML_LOADER: type[yaml.SafeLoader] = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


@dataclass(frozen=True, slots=True)
class LoadError:
    file: str
    document: int | None  # 0-based index within a multi-document file; None for file-level problems
    error: FieldError
    kind: str | None = None  # the object's kind when the document named a known one

    def __str__(self) -> str:
        where = self.file if self.document is None else f"{self.file} (document {self.document})"
        return f"{where}: {self.error}"


@dataclass(slots=True)
class LoadResult:
    objects: list[Versioned] = field(default_factory=list)
    errors: list[LoadError] = field(default_factory=list)
    documents: list[int] = field(default_factory=list)  # document index of each of `objects`, in order
    api_versions: list[str] = field(default_factory=list)  # apiVersion each of `objects` was written in

    @property
    def ok(self) -> bool:
        return not self.errors


def content_version(data: Any) -> str:
    """Version of an object from a file: its generation if set, else a hash of its content."""
    metadata = data.get("metadata") if isinstance(data, dict) else None
    if isinstance(metadata, dict) and isinstance(metadata.get("generation"), int):
        return str(metadata["generation"])
    digest = hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()
    return f"sha256:{digest[:12]}"


def describe_key(key: ObjectKey) -> str:
    """("EgressPolicy", "shop", "payments") -> "EgressPolicy shop/payments", for messages people read."""
    kind, namespace, name = key
    return f"{kind} {namespace}/{name}" if namespace else f"{kind} {name}"


def _yaml_problem(exc: yaml.YAMLError) -> FieldError:
    mark = getattr(exc, "problem_mark", None)
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    problem = getattr(exc, "problem", None) or str(exc)
    return FieldError("", f"YAML syntax error: {where}{problem}", "fix the YAML syntax")


def load_text(text: str, source: str) -> LoadResult:
    """Parse and validate every document of one YAML text. Empty documents are skipped."""
    result = LoadResult()
    try:
        documents = list(yaml.load_all(text, Loader=_YAML_LOADER))
    except yaml.YAMLError as exc:
        result.errors.append(LoadError(source, None, _yaml_problem(exc)))
        return result
    seen: dict[ObjectKey, int] = {}
    for index, data in enumerate(documents):
        if data is None:
            continue
        try:
            policy = validate_object(data)
        except PolicyValidationError as exc:
            named = data.get("kind") if isinstance(data, dict) else None
            kind = named if isinstance(named, str) and named in KINDS else None  # `kind: [..]` is not hashable
            result.errors.extend(LoadError(source, index, err, kind) for err in exc.errors)
            continue
        key = object_key(policy)
        if key in seen:
            result.errors.append(
                LoadError(
                    source,
                    index,
                    FieldError("metadata.name", f"{describe_key(key)} is defined twice (also document {seen[key]})"),
                )
            )
            continue
        seen[key] = index
        result.objects.append(Versioned(policy, content_version(data)))
        result.documents.append(index)
        result.api_versions.append(str(data.get("apiVersion")))
    return result


def load_file(path: Path) -> LoadResult:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        return LoadResult(errors=[LoadError(str(path), None, FieldError("", f"cannot read file: {exc}"))])
    return load_text(text, str(path))


def policy_files(directory: Path) -> list[Path]:
    """Every *.yaml / *.yml below `directory`, sorted; hidden entries (e.g. ConfigMap `..data`) are skipped."""
    if directory.is_file():
        return [directory]
    files = []
    for path in directory.rglob("*"):
        relative = path.relative_to(directory)
        if any(part.startswith(".") for part in relative.parts):
            continue
        if path.suffix in POLICY_SUFFIXES and path.is_file():
            files.append(path)
    return sorted(files)


def load_paths(paths: Iterable[Path]) -> dict[Path, LoadResult]:
    """Load files and directories (no watching). Objects defined in two files are errors in the later file."""
    results: dict[Path, LoadResult] = {}
    owners: dict[ObjectKey, Path] = {}
    for root in paths:
        if not root.exists():
            results[root] = LoadResult(errors=[LoadError(str(root), None, FieldError("", "no such file or directory"))])
            continue
        for path in policy_files(root):
            result = load_file(path)
            for item in result.objects:
                key = object_key(item.policy)
                if key in owners and owners[key] != path:
                    result.errors.append(
                        LoadError(
                            str(path),
                            None,
                            FieldError(
                                "metadata.name",
                                f"{describe_key(key)} is also defined in {owners[key]}",
                                "each object may be defined in one file only; rename or remove one of them",
                            ),
                        )
                    )
                owners.setdefault(key, path)
            results[path] = result
    return results


def load_into_store(paths: Iterable[Path], store: PolicyStore) -> list[LoadError]:
    """One-shot load of files/directories into `store` (used by `check`, `audit --replay`, tests)."""
    errors: list[LoadError] = []
    with store.batch():
        for path, result in load_paths(paths).items():
            errors.extend(result.errors)
            if result.ok:
                store.replace_group(str(path), result.objects)
        store.mark_loaded()
    return errors


class FilePolicySource:
    """Loads a policy directory into a store and keeps it in sync with the files (watchfiles + periodic rescan)."""

    def __init__(
        self,
        path: Path,
        store: PolicyStore,
        log: Any = None,
        *,
        rescan_interval_s: float = 5.0,
        debounce_ms: int = 100,
    ) -> None:
        self.path = path
        self.store = store
        self.log = log or structlog.get_logger("egress_gateway.sources.files")
        self.rescan_interval_s = rescan_interval_s
        self.debounce_ms = debounce_ms
        self.errors: dict[str, list[LoadError]] = {}
        self.reloads = 0
        self._hashes: dict[Path, str] = {}
        self._last_sync: float | None = None
        self._ready = False
        self._tasks: list[asyncio.Task[None]] = []
        self._lock = asyncio.Lock()

    @property
    def ready(self) -> bool:
        return self._ready

    def staleness_seconds(self) -> float | None:
        return None if self._last_sync is None else time.monotonic() - self._last_sync

    async def start(self) -> None:
        metrics.track_source("files", self.staleness_seconds, lambda: self.ready)
        await self.sync()
        self._tasks = [
            asyncio.create_task(self._watch(), name="policy-files-watch"),
            asyncio.create_task(self._rescan_forever(), name="policy-files-rescan"),
        ]

    async def _settle(self) -> None:
        # The watcher only sees changes made after it started; resync shortly after start so an edit made during
        # startup applies within a second instead of waiting for the periodic rescan.
        for delay in (0.25, 0.75):
            await asyncio.sleep(delay)
            await self.sync()

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []

    async def sync(self) -> None:
        async with self._lock:
            self._sync_now()

    def _sync_now(self) -> None:
        with self.store.batch():
            first_load = self._sync_files()
        if first_load:
            self.log.info("policies_loaded", path=str(self.path), policies=len(self.store.current))

    def _sync_files(self) -> bool:
        """Apply what changed on disk; True when this was the first successful load."""
        if not self.path.exists():
            self.log.error("policy_source_missing", path=str(self.path))
            return False
        present = set(policy_files(self.path))
        for gone in set(self._hashes) - present:
            del self._hashes[gone]
            self.errors.pop(str(gone), None)
            self.store.replace_group(str(gone), [])
            self.log.info("policy_file_removed", file=str(gone))
        for path in sorted(present):
            try:
                raw = path.read_bytes()
            except OSError as exc:
                self.log.error("policy_file_unreadable", file=str(path), error=str(exc))
                continue
            digest = hashlib.sha256(raw).hexdigest()
            if self._hashes.get(path) == digest:
                continue
            self._hashes[path] = digest
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                error = LoadError(str(path), None, FieldError("", f"cannot read file: {exc}"))
                self._apply(path, LoadResult(errors=[error]))
                continue
            self._apply(path, load_text(text, str(path)))
        self._check_duplicates()
        self._publish_counts()
        self._last_sync = time.monotonic()
        if self._ready:
            return False
        self._ready = True
        self.store.mark_loaded()
        return True

    def _apply(self, path: Path, result: LoadResult) -> None:
        if not result.ok:
            self.errors[str(path)] = result.errors
            kept = len(self.store.group_keys(str(path)))
            for err in result.errors:
                self.log.error(
                    "policy_rejected",
                    file=err.file,
                    document=err.document,
                    field=err.error.field,
                    error=err.error.message,
                    hint=err.error.hint,
                    kept_previous_objects=kept,
                )
            return
        self.errors.pop(str(path), None)
        self.store.replace_group(str(path), result.objects)
        self.reloads += 1
        self.log.info("policy_file_loaded", file=str(path), objects=len(result.objects))

    def _publish_counts(self) -> None:
        loaded = {kind: 0 for kind in KINDS}
        for kind, _namespace, _name in self.store.keys():  # noqa: SIM118 (a method returning a set, not a dict)
            loaded[kind] = loaded.get(kind, 0) + 1
        invalid = {kind: set[tuple[str, int | None]]() for kind in KINDS}
        for errors in self.errors.values():
            for err in errors:
                invalid.setdefault(err.kind or "unknown", set()).add((err.file, err.document))
        for kind in sorted(set(loaded) | set(invalid)):
            metrics.set_policy_counts(kind, loaded=loaded.get(kind, 0), invalid=len(invalid.get(kind, ())))

    def _check_duplicates(self) -> None:
        owners: dict[ObjectKey, str] = {}
        for path in sorted(self._hashes):
            for key in self.store.group_keys(str(path)):
                if key in owners:
                    self.log.warning("policy_defined_twice", object=list(key), files=[owners[key], str(path)])
                owners.setdefault(key, str(path))

    async def _watch(self) -> None:
        from watchfiles import awatch

        watch_root = self.path if self.path.is_dir() else self.path.parent
        while True:
            try:
                async for _changes in awatch(
                    watch_root, debounce=self.debounce_ms, step=20, recursive=True, force_polling=False
                ):
                    await self.sync()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # watching is best effort; the periodic rescan still runs
                self.log.warning("policy_watch_failed", error=str(exc))
                await asyncio.sleep(self.rescan_interval_s)

    async def _rescan_forever(self) -> None:
        await self._settle()
        while True:
            await asyncio.sleep(self.rescan_interval_s)
            try:
                await self.sync()
            except Exception as exc:
                self.log.error("policy_rescan_failed", error=str(exc))
