"""Identity `service-account-token`: the client proves who it is with a projected ServiceAccount token.

Owns: `TokenIdentityResolver(settings)`. The token comes in `Proxy-Authorization: Bearer <token>` (or Basic with
the token as the password) and is validated with the TokenReview API for `identity.token_audience`.

- Before any review: anything that is not exactly one well-formed JWT, or whose `exp` has passed, is refused
  locally (`identity/jwt.py`); the cache key and the reviewed text are the token's canonical form, so one token
  cannot be spelled into many cache entries.
- Reviews that reach the API server are limited per client address (`identity.token_reviews_per_address`;
  `TooManyReviews` -> 429). Cached verdicts cost nothing.
- Approvals are cached (LRU, at most `identity.token_cache_size`) for `identity.token_cache_ttl_s` or until the
  token's `exp`, whichever is first; rejections for a few seconds in a separate LRU
  (`identity.token_rejection_cache_size`), so rejected tokens never evict approved ones.
- Revocation seen by the shared `WorkloadIndex` is applied locally, before the cache lifetime ends: the bound pod
  deleted (or finished), the ServiceAccount deleted or re-created, a legacy token's Secret removed from its
  ServiceAccount. The API server's own TokenReview cache would accept such a token for a few more seconds.
- With `identity.bind_token_to_pod_ip`, a token is accepted only from the address of the pod it is bound to
  (TokenReview's `authentication.kubernetes.io/pod-name`/`pod-uid` extras); a token bound to no pod only from a pod
  of its own namespace running as its ServiceAccount.

The namespace and ServiceAccount come from the authenticated user name, the pod from the pod-name extra; labels
from the index. A missing token (when no other mode follows in `identity.mode`), a refused one, or a TokenReview
that cannot be made raises `AuthenticationFailed` (-> 407, no upstream connection). No token text is ever logged.
Imports the kube plumbing, settings, audit metrics and the identity contract.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import math
import time
from collections import OrderedDict
from dataclasses import dataclass

import structlog
from kubernetes.aio.client import ApiClient, AuthenticationV1Api, V1TokenReview, V1TokenReviewSpec
from kubernetes.aio.client.exceptions import ApiException

from egress_gateway import metrics
from egress_gateway.identity.base import AuthenticationFailed, TooManyReviews
from egress_gateway.identity.jwt import MalformedToken, ParsedToken, parse_token
from egress_gateway.identity.review_limits import AddressRateLimiter
from egress_gateway.kube.client import connect
from egress_gateway.kube.workloads import PodRecord, WorkloadIndex, canonical_ip
from egress_gateway.policy.decision import Identity
from egress_gateway.settings import Settings

POD_NAME_EXTRA = "authentication.kubernetes.io/pod-name"
POD_UID_EXTRA = "authentication.kubernetes.io/pod-uid"
RECHECK_AFTER_S = 1.0  # a cached verdict whose pod is gone is re-reviewed, at most this often
SERVICE_ACCOUNT_PREFIX = "system:serviceaccount:"
REJECTION_TTL_S = 5.0
REVIEW_TIMEOUT_S = 5.0
NEW_POD_WAIT_S = 1.0  # a token whose pod the index has not seen yet: how long to wait for the pod's watch event


@dataclass(frozen=True, slots=True)
class Review:
    """What TokenReview said about one token."""

    namespace: str | None = None
    service_account: str | None = None
    pod: str | None = None
    pod_uid: str | None = None
    user_uid: str | None = None  # a ServiceAccount token's user UID is its ServiceAccount's UID
    error: str | None = None  # set when the token was rejected


@dataclass(frozen=True, slots=True)
class _Cached:
    review: Review
    expires_at: float  # wall clock, seconds
    reviewed_at: float
    secret: str | None = None  # a legacy token's Secret, when its ServiceAccount listed it at approval time


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
    """The `exp` claim of a JWT, unverified; None if it has none or is not a JWT."""
    try:
        return parse_token(token).expiry
    except MalformedToken:
        return None


class TokenIdentityResolver:
    def __init__(self, settings: Settings, index: WorkloadIndex | None = None) -> None:
        identity = settings.identity
        self.settings = settings
        self.audience = identity.token_audience
        self.cache_size = identity.token_cache_size
        self.rejection_cache_size = identity.token_rejection_cache_size
        self.approval_ttl_s = identity.token_cache_ttl_s
        self.bind_to_pod_ip = identity.binds_tokens_to_pod_ip
        self.limiter = AddressRateLimiter(
            identity.token_reviews_per_address.per_second, identity.token_reviews_per_address.burst
        )
        modes = list(identity.mode)
        here = modes.index("service-account-token") if "service-account-token" in modes else len(modes)
        self.optional = here < len(modes) - 1  # another mode follows: no token is not an error
        self.index = index or WorkloadIndex.shared(settings)
        self._api: ApiClient | None = None
        self._reviews: AuthenticationV1Api | None = None
        self._approved: OrderedDict[str, _Cached] = OrderedDict()
        self._rejected: OrderedDict[str, _Cached] = OrderedDict()
        self._inflight: dict[str, asyncio.Task[Review]] = {}
        self._log = structlog.get_logger("egress_gateway.identity.tokens")
        self.reviews_made = 0

    @property
    def ready(self) -> bool:
        """True once pods and namespaces are listed (before that every client is unknown)."""
        return self.index.ready

    @property
    def cached_approvals(self) -> int:
        return len(self._approved)

    @property
    def cached_rejections(self) -> int:
        return len(self._rejected)

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
        text = token_from_header(proxy_authorization)
        if text is None:
            if self.optional and not proxy_authorization:
                return None
            raise AuthenticationFailed(
                "proxy authentication required: send a ServiceAccount token as 'Proxy-Authorization: Bearer <token>'"
                if not proxy_authorization
                else "unsupported Proxy-Authorization: use 'Bearer <token>' or Basic with the token as password"
            )
        token = _parse(text)
        review = await self.review(token, client_ip)
        namespace = _accepted_namespace(review)
        if not self.index.ready:
            return None  # labels unknown yet: do not guess (fails closed as unknown_client)
        self._refuse_if_revoked(token, review)
        if self.bind_to_pod_ip and review.pod and self.index.pod(namespace, review.pod) is None:
            await self._wait_for_pod(namespace, review.pod)  # binding needs the pod's address
        if review.pod and not self._pod_matches(review):
            # The pod this token is bound to is not (or no longer) the indexed one: the API server invalidates
            # such tokens, so a cached verdict may be stale. Ask again (a brand-new pod may not be indexed yet).
            review = await self.review(token, client_ip, recheck=True)
            namespace = _accepted_namespace(review)
            self._refuse_if_revoked(token, review)
        if self.bind_to_pod_ip:
            self._check_sender(client_ip, review)
        if review.pod:
            identity = self.index.identity_for_pod(namespace, review.pod)
            if identity is not None:
                return identity
        return Identity(
            namespace=namespace,
            pod=review.pod,
            namespace_labels=self.index.namespace_labels(namespace),
            service_account=review.service_account,
            pod_uid=review.pod_uid if review.pod else None,
        )

    # ---------------------------------------------------------------- local checks
    def _refuse_if_revoked(self, token: ParsedToken, review: Review) -> None:
        """Refuse at once what the index has seen revoked (the API server may still accept it for a while)."""
        reason = self._revocation(token, review)
        if reason is None:
            return
        self._approved.pop(token.cache_key, None)
        metrics.token_review("refused_locally")
        self._log.info("token_revoked_locally", namespace=review.namespace, pod=review.pod, why=reason)
        raise AuthenticationFailed(f"ServiceAccount token rejected: {reason}")

    def _revocation(self, token: ParsedToken, review: Review) -> str | None:
        index, namespace = self.index, review.namespace or ""
        if review.pod_uid and index.pod_gone(review.pod_uid):
            return f"the pod it is bound to ({namespace}/{review.pod}) was deleted or has finished"
        if review.user_uid and index.service_account_gone(review.user_uid):
            return f"its ServiceAccount {namespace}/{review.service_account} was deleted"
        account = index.service_account(namespace, review.service_account or "")
        if account is not None and review.user_uid and account.uid != review.user_uid:
            return f"its ServiceAccount {namespace}/{review.service_account} was deleted and re-created"
        cached = self._approved.get(token.cache_key)
        secret = cached.secret if cached is not None else None
        if secret is not None and account is not None and secret not in account.secrets:
            return f"its Secret {namespace}/{secret} is no longer listed by its ServiceAccount"
        return None

    def _pod_matches(self, review: Review) -> bool:
        record = self.index.pod(review.namespace or "", review.pod or "")
        return record is not None and (review.pod_uid is None or record.uid == review.pod_uid)

    async def _wait_for_pod(self, namespace: str, name: str) -> None:
        # A pod's first request can arrive before its watch event: give the index a moment.
        deadline = time.monotonic() + NEW_POD_WAIT_S
        while self.index.pod(namespace, name) is None and time.monotonic() < deadline:
            await asyncio.sleep(0.05)

    def _check_sender(self, client_ip: str, review: Review) -> None:
        """`identity.bind_token_to_pod_ip`: the connection must come from the token's pod (or, for a token bound
        to no pod, from a pod of its namespace running as its ServiceAccount)."""
        namespace = review.namespace or ""
        if not self.index.addresses_trusted():
            metrics.token_review("refused_locally")
            raise AuthenticationFailed(
                f"cannot check that the token comes from its pod's address: {self.index.untrusted_reason()}"
            )
        owner = self.index.owner_of(client_ip)
        if review.pod:
            ok = _is_pod(owner, namespace, review.pod, review.pod_uid)
            expected = f"pod {namespace}/{review.pod}"
        else:
            ok = owner is not None and owner.namespace == namespace and owner.service_account == review.service_account
            expected = f"a pod running as ServiceAccount {namespace}/{review.service_account}"
        if ok:
            return
        metrics.token_review("refused_locally")
        sender = f"pod {owner.namespace}/{owner.name}" if owner is not None else "no known pod"
        self._log.warning(
            "token_sender_mismatch", namespace=namespace, pod=review.pod, client_address=client_ip, sender=sender
        )
        raise AuthenticationFailed(
            f"the token belongs to {expected} but was sent from {canonical_ip(client_ip) or client_ip} "
            f"({sender}); identity.bind_token_to_pod_ip accepts a token only from its pod's address"
        )

    # ---------------------------------------------------------------- TokenReview, cached
    async def review(self, token: ParsedToken, client_ip: str = "", *, recheck: bool = False) -> Review:
        """TokenReview's verdict on `token`, cached; `recheck` asks again unless the verdict is very recent."""
        key = token.cache_key
        now = time.time()
        approved = self._approved.get(key)
        if approved is not None:
            fresh_enough = not recheck or now - approved.reviewed_at < RECHECK_AFTER_S
            if approved.expires_at > now and fresh_enough:
                self._approved.move_to_end(key)
                metrics.token_review("cached")
                return approved.review
            del self._approved[key]
        rejected = self._rejected.get(key)
        if rejected is not None:
            if rejected.expires_at > now:
                self._rejected.move_to_end(key)
                metrics.token_review("cached")
                return rejected.review
            del self._rejected[key]
        # One review per token at a time, in its own task: a caller that gives up does not cancel it for others.
        task = self._inflight.get(key)
        if task is None:
            wait = self.limiter.acquire(canonical_ip(client_ip) or client_ip)
            if wait > 0:
                metrics.token_review("rate_limited")
                raise TooManyReviews(
                    f"too many token reviews from {client_ip}: at most {self.limiter.describe()}; "
                    f"retry in {max(1, math.ceil(wait))} s",
                    retry_after_s=wait,
                )
            task = asyncio.create_task(self._review_and_cache(token))
            self._inflight[key] = task
            task.add_done_callback(lambda done: self._review_done(key, done))
        return await asyncio.shield(task)

    def _review_done(self, key: str, task: asyncio.Task[Review]) -> None:
        self._inflight.pop(key, None)
        if not task.cancelled():
            task.exception()  # retrieved here: every waiter still gets it through its shield

    async def _review_and_cache(self, token: ParsedToken) -> Review:
        try:
            review = await self._token_review(token.canonical)
        except AuthenticationFailed:
            metrics.token_review("error")
            raise
        now = time.time()
        if review.error is None:
            metrics.token_review("approved")
            expiry = token.expiry
            expires_at = now + self.approval_ttl_s if expiry is None else min(expiry, now + self.approval_ttl_s)
            self._approved[token.cache_key] = _Cached(review, expires_at, now, self._listed_secret(token, review))
            _trim(self._approved, self.cache_size)
        else:
            metrics.token_review("rejected")
            self._rejected[token.cache_key] = _Cached(review, now + REJECTION_TTL_S, now)
            _trim(self._rejected, self.rejection_cache_size)
        return review

    def _listed_secret(self, token: ParsedToken, review: Review) -> str | None:
        """A legacy token's Secret, if its ServiceAccount lists it now (its disappearance then means deletion)."""
        account = self.index.service_account(review.namespace or "", review.service_account or "")
        secret = token.secret_name
        return secret if account is not None and secret is not None and secret in account.secrets else None

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
            user_uid=status.user.uid or None,
        )


def _parse(text: str) -> ParsedToken:
    try:
        token = parse_token(text)
    except MalformedToken as exc:
        metrics.token_review("refused_locally")
        raise AuthenticationFailed(f"malformed ServiceAccount token: {exc}") from None
    expiry = token.expiry
    if expiry is not None and expiry <= time.time():
        metrics.token_review("refused_locally")
        raise AuthenticationFailed("ServiceAccount token rejected: the token has expired (its exp has passed)")
    return token


def _is_pod(record: PodRecord | None, namespace: str, name: str, uid: str | None) -> bool:
    return (
        record is not None
        and record.namespace == namespace
        and record.name == name
        and (uid is None or record.uid == uid)
    )


def _trim(cache: OrderedDict[str, _Cached], size: int) -> None:
    while len(cache) > size:
        cache.popitem(last=False)


def build(settings: Settings) -> TokenIdentityResolver:
    """Factory used by the app's `identity.mode` wiring."""
    return TokenIdentityResolver(settings)
