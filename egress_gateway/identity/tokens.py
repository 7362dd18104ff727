"""Identity `service-account-token`: the client proves who it is with a projected ServiceAccount token.

Owns: `TokenIdentityResolver(settings)`. The token comes in `Proxy-Authorization: Bearer <token>` (or Basic with
the token as the password) and is validated with the TokenReview API for `identity.token_audience`. Results are
cached (LRU, at most `identity.token_cache_size`) until the token's own `exp`; rejections for a few seconds.
The namespace and ServiceAccount come from the authenticated user name, the pod from the
`authentication.kubernetes.io/pod-name` extra; labels from the shared `WorkloadIndex`. A missing token (when no
other mode follows in `identity.mode`), a rejected one, or a TokenReview that cannot be made raises
`AuthenticationFailed` (-> 407, no upstream connection). Imports the kube plumbing, settings and identity base.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import json
import time
from collections import OrderedDict
from dataclasses import dataclass

import structlog
from kubernetes.aio.client import ApiClient, AuthenticationV1Api, V1TokenReview, V1TokenReviewSpec
from kubernetes.aio.client.exceptions import ApiException

from egress_gateway.identity.base import AuthenticationFailed
from egress_gateway.kube.client import connect
from egress_gateway.kube.workloads import WorkloadIndex
from egress_gateway.policy.decision import Identity
from egress_gateway.settings import Settings

POD_NAME_EXTRA = "authentication.kubernetes.io/pod-name"
POD_UID_EXTRA = "authentication.kubernetes.io/pod-uid"
RECHECK_AFTER_S = 1.0  # a cached verdict whose pod is gone is re-reviewed, at most this often
SERVICE_ACCOUNT_PREFIX = "system:serviceaccount:"
REJECTION_TTL_S = 5.0
NO_EXPIRY_TTL_S = 60.0  # tokens without an `exp` claim are re-reviewed this often
REVIEW_TIMEOUT_S = 5.0


@dataclass(frozen=True, slots=True)
class Review:
    """What TokenReview said about one token."""

    namespace: str | None = None
    service_account: str | None = None
    pod: str | None = None
    pod_uid: str | None = None
    error: str | None = None  # set when the token was rejected


@dataclass(frozen=True, slots=True)
class _Cached:
    review: Review
    expires_at: float  # wall clock, seconds
    reviewed_at: float


def _accepted_namespace(review: Review) -> str:
    if review.error is not None or review.namespace is None:
        raise AuthenticationFailed(f"ServiceAccount token rejected: {review.error}")
    return review.namespace


def token_from_header(value: str | None) -> str | None:
    """The token in `Proxy-Authorization`: `Bearer <token>`, or `Basic base64(user:token)`."""
    if not value:
        return None
    scheme, _, credentials = value.strip().partition(" ")
    credentials = credentials.strip()
    if scheme.lower() == "bearer":
        return credentials or None
    if scheme.lower() == "basic":
        try:
            decoded = base64.b64decode(credentials, validate=True).decode()
        except (binascii.Error, UnicodeDecodeError):
            return None
        _, _, password = decoded.partition(":")
        return password or None
    return None


def token_expiry(token: str) -> float | None:
    """The `exp` claim of a JWT, unverified (TokenReview did the verifying); None if it has none."""
    parts = token.split(".")
    if len(parts) != 3:
        return None
    payload = parts[1] + "=" * (-len(parts[1]) % 4)
    try:
        claims = json.loads(base64.urlsafe_b64decode(payload))
    except (binascii.Error, ValueError):
        return None
    exp = claims.get("exp") if isinstance(claims, dict) else None
    return float(exp) if isinstance(exp, int | float) else None


class TokenIdentityResolver:
    def __init__(self, settings: Settings, index: WorkloadIndex | None = None) -> None:
        self.settings = settings
        self.audience = settings.identity.token_audience
        self.cache_size = settings.identity.token_cache_size
        modes = list(settings.identity.mode)
        here = modes.index("service-account-token") if "service-account-token" in modes else len(modes)
        self.optional = here < len(modes) - 1  # another mode follows: no token is not an error
        self.index = index or WorkloadIndex.shared(settings)
        self._api: ApiClient | None = None
        self._reviews: AuthenticationV1Api | None = None
        self._cache: OrderedDict[str, _Cached] = OrderedDict()
        self._inflight: dict[str, asyncio.Task[Review]] = {}
        self._log = structlog.get_logger("egress_gateway.identity.tokens")
        self.reviews_made = 0

    @property
    def ready(self) -> bool:
        """True once pods and namespaces are listed (before that every client is unknown)."""
        return self.index.ready

    async def start(self) -> None:
        self._api = await connect(self.settings.kubernetes)
        self._reviews = AuthenticationV1Api(self._api)
        await self.index.start()

    async def stop(self) -> None:
        await self.index.stop()
        if self._api is not None:
            await self._api.close()
            self._api = None

    async def identify(self, client_ip: str, proxy_authorization: str | None) -> Identity | None:
        token = token_from_header(proxy_authorization)
        if token is None:
            if self.optional and not proxy_authorization:
                return None
            raise AuthenticationFailed(
                "proxy authentication required: send a ServiceAccount token as 'Proxy-Authorization: Bearer <token>'"
                if not proxy_authorization
                else "unsupported Proxy-Authorization: use 'Bearer <token>' or Basic with the token as password"
            )
        review = await self.review(token)
        namespace = _accepted_namespace(review)
        if not self.index.ready:
            return None  # labels unknown yet: do not guess (fails closed as unknown_client)
        if review.pod and not self._pod_matches(review):
            # The pod this token is bound to is gone or was replaced: the API server invalidates such tokens, so a
            # cached verdict may be stale. Ask again (a brand-new pod may simply not be indexed yet).
            review = await self.review(token, recheck=True)
            namespace = _accepted_namespace(review)
        if review.pod:
            identity = self.index.identity_for_pod(namespace, review.pod)
            if identity is not None:
                return identity
        return Identity(
            namespace=namespace,
            pod=review.pod,
            namespace_labels=self.index.namespace_labels(namespace),
            service_account=review.service_account,
        )

    def _pod_matches(self, review: Review) -> bool:
        record = self.index.pod(review.namespace or "", review.pod or "")
        return record is not None and (review.pod_uid is None or record.uid == review.pod_uid)

    async def review(self, token: str, *, recheck: bool = False) -> Review:
        """TokenReview's verdict on `token`, cached; `recheck` asks again unless the verdict is very recent."""
        digest = hashlib.sha256(token.encode()).hexdigest()
        cached = self._cache.get(digest)
        if cached is not None:
            now = time.time()
            fresh_enough = not recheck or now - cached.reviewed_at < RECHECK_AFTER_S
            if cached.expires_at > now and fresh_enough:
                self._cache.move_to_end(digest)
                return cached.review
            del self._cache[digest]
        # One review per token at a time, in its own task: a caller that gives up does not cancel it for others.
        task = self._inflight.get(digest)
        if task is None:
            task = asyncio.create_task(self._review_and_cache(token, digest))
            self._inflight[digest] = task
            task.add_done_callback(lambda done: self._review_done(digest, done))
        return await asyncio.shield(task)

    def _review_done(self, digest: str, task: asyncio.Task[Review]) -> None:
        self._inflight.pop(digest, None)
        if not task.cancelled():
            task.exception()  # retrieved here: every waiter still gets it through its shield

    async def _review_and_cache(self, token: str, digest: str) -> Review:
        review = await self._token_review(token)
        if review.error is None:
            expiry = token_expiry(token)
            expires_at = expiry if expiry is not None else time.time() + NO_EXPIRY_TTL_S
        else:
            expires_at = time.time() + REJECTION_TTL_S
        self._cache[digest] = _Cached(review, expires_at, time.time())
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return review

    async def _token_review(self, token: str) -> Review:
        if self._reviews is None:
            raise AuthenticationFailed("token authentication is not started")
        body = V1TokenReview(spec=V1TokenReviewSpec(token=token, audiences=[self.audience]))
        try:
            result = await self._reviews.create_token_review(body, _request_timeout=REVIEW_TIMEOUT_S)
        except ApiException as exc:
            self._log.warning("token_review_failed", status=exc.status, reason=exc.reason)
            raise AuthenticationFailed(f"cannot validate the token (TokenReview: HTTP {exc.status})") from None
        except (OSError, TimeoutError, Exception) as exc:
            self._log.warning("token_review_failed", error=f"{type(exc).__name__}: {exc}")
            raise AuthenticationFailed("cannot validate the token (API server unreachable)") from None
        self.reviews_made += 1
        status = result.status
        if status is None or not status.authenticated or status.user is None:
            return Review(error=(status.error if status is not None and status.error else "not authenticated"))
        if status.audiences is not None and self.audience not in status.audiences:
            return Review(error=f"token is not for audience {self.audience!r}")
        username = status.user.username or ""
        if not username.startswith(SERVICE_ACCOUNT_PREFIX):
            return Review(error=f"{username!r} is not a ServiceAccount")
        namespace, _, account = username.removeprefix(SERVICE_ACCOUNT_PREFIX).partition(":")
        extra = status.user.extra or {}
        pods = extra.get(POD_NAME_EXTRA) or []
        uids = extra.get(POD_UID_EXTRA) or []
        return Review(
            namespace=namespace,
            service_account=account or None,
            pod=pods[0] if pods else None,
            pod_uid=uids[0] if uids else None,
        )


def build(settings: Settings) -> TokenIdentityResolver:
    """Factory used by the app's `identity.mode` wiring."""
    return TokenIdentityResolver(settings)
