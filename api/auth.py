"""Bearer-token authentication (what a JobSpec may reach is api/paths.py's policy).

Tokens map to owners (from SAEFORGE_TOKENS_FILE / SAEFORGE_TOKENS); a job belongs to the owner whose token
submitted it and only that owner may read, cancel or tail it. Tokens are compared in constant time and
never logged or echoed.
"""

from __future__ import annotations

import hmac

from fastapi import HTTPException, Request, status

TOKEN_COOKIE = "saeforge_token"  # set by the pages' login form (api/pages.py)


class Authenticator:
    def __init__(self, tokens: dict[str, str]):
        self._tokens = [(token.encode(), owner) for token, owner in tokens.items()]

    def owner_of(self, token: str) -> str | None:
        given = token.encode()
        found = None
        for known, owner in self._tokens:  # no early exit: the time taken does not depend on which matched
            if hmac.compare_digest(known, given):
                found = owner
        return found

    def __call__(self, request: Request) -> str:
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if not header and request.method in ("GET", "HEAD") and request.cookies.get(TOKEN_COOKIE):
            # The pages' login form sets this HttpOnly, SameSite=Strict cookie; it is honoured on reads only, so
            # no cross-site form can make a browser change anything with it.
            scheme, token = "bearer", request.cookies[TOKEN_COOKIE]
        if scheme.lower() != "bearer" or not token.strip():
            raise HTTPException(status.HTTP_401_UNAUTHORIZED, "missing bearer token: send 'Authorization: Bearer "
                                "<token>' (saeforge CLI: --token or SAEFORGE_API_TOKEN)",
                                headers={"WWW-Authenticate": "Bearer"})
        owner = self.owner_of(token.strip())
        if owner is None:
            raise HTTPException(status.HTTP_401_UNAUTHORIZED, "unknown token", headers={"WWW-Authenticate": "Bearer"})
        return owner
