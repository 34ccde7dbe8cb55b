"""Authentication and authorization at the gRPC edge: one interceptor, one table of roles per RPC.

Callers send ``authorization: Bearer TOKEN``. TOKEN is an API key (the server keeps only its SHA-256, from a mounted
file) or a JWT verified against a JWKS (file or URL) with issuer and audience checked and the role read from a claim.
Failure codes: UNAUTHENTICATED (no, malformed or unverifiable credentials), PERMISSION_DENIED (the role does not
include the RPC), RESOURCE_EXHAUSTED (the caller's request rate limit). Health and reflection stay open.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import jwt
from imageflow.common.errors import permission_denied, unauthenticated
from imageflow.common.grpc_errors import rewrap_handler
from imageflow.server.domain.access import ANONYMOUS, Principal, RateLimiter, Role, set_current_principal
from imageflow.v1 import pipeline_service_pb2, tool_registry_service_pb2

log = logging.getLogger(__name__)

_PIPELINES = "/imageflow.v1.PipelineService/"
_REGISTRY = "/imageflow.v1.ToolRegistryService/"

METHOD_ROLES: dict[str, Role] = {
    _PIPELINES + "GetPipeline": Role.VIEWER,
    _PIPELINES + "ListPipelines": Role.VIEWER,
    _PIPELINES + "GetExecution": Role.VIEWER,
    _PIPELINES + "WatchExecution": Role.VIEWER,
    _PIPELINES + "ReadExecutionOutput": Role.VIEWER,
    _PIPELINES + "GeneratePipeline": Role.OPERATOR,
    _PIPELINES + "ValidatePipeline": Role.OPERATOR,
    _PIPELINES + "SavePipeline": Role.OPERATOR,
    _PIPELINES + "DeletePipeline": Role.OPERATOR,
    _PIPELINES + "ExecutePipeline": Role.OPERATOR,
    _PIPELINES + "ExecutePipelineUpload": Role.OPERATOR,
    _PIPELINES + "CancelExecution": Role.OPERATOR,
    _REGISTRY + "ListTools": Role.VIEWER,
    _REGISTRY + "GetTool": Role.VIEWER,
    _REGISTRY + "RegisterTool": Role.ADMIN,
    _REGISTRY + "RemoveTool": Role.ADMIN,
    _REGISTRY + "ImportTritonModels": Role.ADMIN,
}
"""The role each RPC needs. An RPC missing here is refused for everyone (a test checks the table covers the API)."""

OPEN_PREFIXES = ("/grpc.health.v1.Health/",)
REFLECTION_PREFIXES = ("/grpc.reflection.v1alpha.ServerReflection/", "/grpc.reflection.v1.ServerReflection/")

_KEY_LINE = re.compile(r"^(?P<role>[A-Za-z]+)\s+sha256:(?P<hex>[0-9a-fA-F]{64})(?:\s+(?P<name>[\w.@-]{1,64}))?$")
JWT_ALGORITHMS = ["RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA"]


def api_methods() -> list[str]:
    """Every RPC of the public API, as full method paths."""
    methods = []
    for module, service in (
        (pipeline_service_pb2, "PipelineService"),
        (tool_registry_service_pb2, "ToolRegistryService"),
    ):
        descriptor = module.DESCRIPTOR.services_by_name[service]
        methods += [f"/{descriptor.full_name}/{method.name}" for method in descriptor.methods]
    return methods


def load_api_keys(path: Path) -> dict[str, Principal]:
    """``ROLE sha256:HEX [NAME]`` per line (``#`` comments); keyed by the hex digest. A bad line fails start-up,
    naming its number but never its content."""
    keys: dict[str, Principal] = {}
    for number, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        match = _KEY_LINE.match(line)
        role = Role.parse(match["role"]) if match else None
        if match is None or role is None:
            raise ValueError(
                f"{path}:{number}: expected 'ROLE sha256:HEX [NAME]' with ROLE viewer, operator or admin "
                "(HEX = the SHA-256 of the key, e.g. `printf %s KEY | sha256sum`)"
            )
        digest = match["hex"].lower()
        keys[digest] = Principal(match["name"] or f"key:{digest[:12]}", role)
    return keys


@dataclass(frozen=True)
class JwtSettings:
    """Where the signing keys are and what a token must say."""

    jwks_file: Path | None
    jwks_url: str | None
    issuer: str | None
    audience: str | None
    roles_claim: str = "roles"


class JwtVerifier:
    """Verifies bearer JWTs: signature against the JWKS (asymmetric algorithms only), expiry, issuer, audience."""

    def __init__(self, settings: JwtSettings) -> None:
        if not settings.issuer or not settings.audience:
            raise ValueError("JWT verification needs IMAGEFLOW_JWT_ISSUER and IMAGEFLOW_JWT_AUDIENCE")
        self._settings = settings
        self._keys = (
            jwt.PyJWKSet.from_json(settings.jwks_file.read_text(encoding="utf-8")) if settings.jwks_file else None
        )
        self._client = jwt.PyJWKClient(settings.jwks_url, lifespan=300, timeout=5) if settings.jwks_url else None

    async def verify(self, token: str) -> Principal:
        """The caller named by a valid token, or UNAUTHENTICATED."""
        try:
            key = await self._signing_key(token)
            claims = jwt.decode(
                token,
                key=key.key,
                algorithms=[key.algorithm_name] if key.algorithm_name in JWT_ALGORITHMS else JWT_ALGORITHMS,
                audience=self._settings.audience,
                issuer=self._settings.issuer,
                options={"require": ["exp", "iss", "aud", "sub"]},
            )
        except (jwt.PyJWTError, KeyError, ValueError) as error:
            raise unauthenticated("TOKEN_INVALID", f"the bearer token is not valid: {_token_problem(error)}") from None
        role = _highest_role(claims.get(self._settings.roles_claim))
        if role is None:
            raise permission_denied(
                "ROLE_MISSING",
                f"the token's {self._settings.roles_claim!r} claim names no role (viewer, operator, admin)",
            )
        return Principal(f"jwt:{str(claims['sub'])[:120]}", role)

    async def _signing_key(self, token: str) -> jwt.PyJWK:
        if self._keys is not None:
            kid = jwt.get_unverified_header(token).get("kid")
            if kid is None:
                if len(self._keys.keys) != 1:
                    raise KeyError("the token has no key id (kid)")
                return self._keys.keys[0]
            return self._keys[kid]
        assert self._client is not None
        return await asyncio.to_thread(self._client.get_signing_key_from_jwt, token)


def _token_problem(error: Exception) -> str:
    if isinstance(error, jwt.ExpiredSignatureError):
        return "it has expired"
    if isinstance(error, jwt.InvalidAudienceError):
        return "wrong audience"
    if isinstance(error, jwt.InvalidIssuerError):
        return "wrong issuer"
    if isinstance(error, KeyError):
        return "signed by an unknown key"
    if isinstance(error, jwt.MissingRequiredClaimError):
        return f"the {error.claim!r} claim is missing"
    return "signature or format check failed"


def _highest_role(claim: Any) -> Role | None:
    names = [claim] if isinstance(claim, str) else claim if isinstance(claim, list) else []
    roles = [role for role in (Role.parse(n) for n in names if isinstance(n, str)) if role is not None]
    return max(roles, default=None)


class Authenticator:
    """Bearer token → Principal, by API key or JWT; `enabled` is False when neither is configured."""

    def __init__(self, api_keys: Mapping[str, Principal], jwt_verifier: JwtVerifier | None) -> None:
        self._keys = dict(api_keys)
        self._jwt = jwt_verifier

    @property
    def enabled(self) -> bool:
        """Whether callers must authenticate."""
        return bool(self._keys) or self._jwt is not None

    async def authenticate(self, metadata: Sequence[tuple[str, str | bytes]] | None) -> Principal:
        """The caller, or UNAUTHENTICATED (the message never echoes the token)."""
        if not self.enabled:
            return ANONYMOUS
        values = [v for k, v in metadata or () if k == "authorization"]
        if not values:
            raise unauthenticated(
                "CREDENTIALS_MISSING", "this server requires authentication: send 'authorization: Bearer <key or JWT>'"
            )
        header = values[0] if isinstance(values[0], str) else values[0].decode("latin-1")
        scheme, _, token = header.strip().partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise unauthenticated("CREDENTIALS_MALFORMED", "the authorization header must be 'Bearer <key or JWT>'")
        principal = self._keys.get(hashlib.sha256(token.encode()).hexdigest())
        if principal is not None:
            return principal
        if self._jwt is not None and token.count(".") == 2:
            return await self._jwt.verify(token)
        raise unauthenticated("CREDENTIALS_INVALID", "the API key or token is not valid")


Behavior = Callable[..., Any]


class AuthInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    """Authenticates each call, checks its role in METHOD_ROLES and its rate limit, then binds the principal for the
    servicer (which records it as the creator of pipelines and executions)."""

    def __init__(self, authenticator: Authenticator, limiter: RateLimiter, *, reflection_open: bool = True) -> None:
        self._authenticator = authenticator
        self._limiter = limiter
        self._open = OPEN_PREFIXES + (REFLECTION_PREFIXES if reflection_open else ())

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],  # type: ignore[type-arg]
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:  # type: ignore[type-arg]
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or method.startswith(self._open):
            return handler
        metadata = handler_call_details.invocation_metadata

        async def admit() -> None:
            principal = await self._authenticator.authenticate(metadata)
            needed = METHOD_ROLES.get(method)
            if needed is None or not principal.may(needed):
                what = method.rsplit("/", 1)[-1]
                raise permission_denied(
                    "ROLE_INSUFFICIENT",
                    f"{what} needs the {needed.label if needed else 'an unknown'} role; "
                    f"{principal.name} has {principal.role.label}",
                )
            self._limiter.check(principal.name)
            set_current_principal(principal)

        guarded = rewrap_handler(
            handler, lambda behavior: _guard_unary(admit, behavior), lambda behavior: _guard_stream(admit, behavior)
        )
        return _refusing_handler(handler) if guarded is None else guarded


def _guard_unary(admit: Callable[[], Awaitable[None]], behavior: Behavior) -> Behavior:
    async def guarded(request: Any, context: Any) -> Any:
        await admit()
        return await behavior(request, context)

    return guarded


def _guard_stream(admit: Callable[[], Awaitable[None]], behavior: Behavior) -> Callable[..., AsyncIterator[Any]]:
    async def guarded(request: Any, context: Any) -> AsyncIterator[Any]:
        await admit()
        async for item in behavior(request, context):
            yield item

    return guarded


def _refusing_handler(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:  # type: ignore[type-arg]
    """Client-streaming RPCs are not part of the API; refuse rather than let one through unchecked."""

    async def refuse(request: Any, context: Any) -> None:
        raise permission_denied("METHOD_CLOSED", "this method is not available")

    return grpc.unary_unary_rpc_method_handler(
        refuse, request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer
    )


def refusal_for_insecure_bind(host: str) -> str:
    """Why a server on a non-loopback address without authentication does not start, and how to fix it."""
    return (
        f"refusing to listen on {host} without authentication: anyone who can reach it could run and change "
        "pipelines. Set IMAGEFLOW_API_KEYS_FILE (lines 'ROLE sha256:HEX', HEX = `printf %s KEY | sha256sum`) "
        "and/or IMAGEFLOW_JWKS_FILE / IMAGEFLOW_JWKS_URL with IMAGEFLOW_JWT_ISSUER and IMAGEFLOW_JWT_AUDIENCE; "
        "or bind 127.0.0.1; or, on a trusted network only, set IMAGEFLOW_ALLOW_INSECURE=true"
    )
