"""The admin API's routes for the query ports' API keys (``/api/v1/api-keys``).

::

    POST   /api/v1/api-keys        {apps: [name, ...], name?: str}
                                   -> 201 {id, key, apps, name, created}; the key is shown this once
    GET    /api/v1/api-keys        -> 200 [{id, name, apps, created}, ...]   (no secrets)
    DELETE /api/v1/api-keys/<id>   -> 200 {revoked: id, name}; at once, also on open connections

Applications must be registered when a key is made (else ``UNKNOWN_APPLICATION``,
404); see :mod:`clipper.security.api_keys` for what happens when one is
unregistered later. The keys live in the frontend's state store and outlive
restarts; they work on the query ports when ``require_api_keys`` is on, and
may be made before it is turned on.
"""

from __future__ import annotations

from ..errors import InvalidConfigError, RequestError

__all__ = ["route"]

_CREATE_FIELDS = {"apps", "name"}


def _err(exc) -> dict:
    return {"error": {"code": exc.code, "name": exc.name, "message": exc.message}}


async def route(fe, method: str, rest: list[str], data: dict) -> tuple[int, object]:
    """Answer one request under ``/api/v1/api-keys`` (``rest`` is the path after ``/api/v1``)."""
    keys = fe.api_keys
    if rest == ["api-keys"]:
        if method == "GET":
            return 200, keys.list()
        if method == "POST":
            unknown = set(data) - _CREATE_FIELDS
            if unknown:
                raise InvalidConfigError(f"unknown key(s) {sorted(unknown)} for an API key; known: "
                                         f"{sorted(_CREATE_FIELDS)}")
            if "apps" not in data:
                raise InvalidConfigError("an API key needs 'apps': the applications it grants")
            key, secret = keys.create(data["apps"], data.get("name"), known_apps=fe.registry.applications)
            return 201, {"id": key.id, "key": secret, **{k: v for k, v in key.public().items() if k != "id"}}
    elif len(rest) == 2 and method == "DELETE":
        if keys.get(rest[1]) is None:
            return 404, _err(InvalidConfigError(f"no API key has id {rest[1]!r}"))
        key = keys.revoke(rest[1])
        return 200, {"revoked": key.id, "name": key.name}
    return 404, _err(RequestError(f"no route {method} /api/v1/{'/'.join(rest)}; expected GET or POST "
                                  f"/api/v1/api-keys, DELETE /api/v1/api-keys/<id>"))
