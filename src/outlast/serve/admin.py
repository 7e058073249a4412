"""Bearer-token checks for the admin endpoints of ``outlast serve`` and ``outlast route``.

Admin routes (``/admin/...``) change what a server serves, so they are off unless a token is
configured (``--admin-token`` or the ``OUTLAST_ADMIN_TOKEN`` environment variable; the variable
keeps the secret out of ``ps``). A request must then carry ``Authorization: Bearer <token>``;
the comparison takes constant time.
"""

from __future__ import annotations

import hmac
import os

from .errors import AdminAuthError

__all__ = ["require_token", "token_from"]

ENV = "OUTLAST_ADMIN_TOKEN"


def token_from(option: str | None) -> str | None:
    """The admin token: the option if given, else ``$OUTLAST_ADMIN_TOKEN``, else None (admin off).

    Example:
        >>> token_from(None)  # reads OUTLAST_ADMIN_TOKEN
    """
    tok = option if option is not None else os.environ.get(ENV)
    return tok or None


def require_token(authorization: str | None, token: str | None) -> None:
    """Raise :class:`AdminAuthError` unless ``authorization`` is ``Bearer <token>``.

    Args:
        authorization: the request's ``Authorization`` header (None if absent).
        token: the configured token (None: admin is off).

    Example:
        >>> require_token(request.headers.get("authorization"), "s3cret")
    """
    if token is None:
        raise AdminAuthError(f"the admin endpoint is off: start the server with --admin-token or ${ENV}",
                             status=403, code="admin_disabled")
    if not authorization:
        raise AdminAuthError("missing admin token: send the header 'Authorization: Bearer <token>'",
                             code="missing_token")
    scheme, _, given = authorization.partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), token.encode()):
        raise AdminAuthError("wrong admin token: send the token the server was started with "
                             "('Authorization: Bearer <token>')", code="invalid_token")
