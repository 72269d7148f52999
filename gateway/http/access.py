"""Who may call which admin route. ``REQUIRED`` names the role each admin and repository route
needs; ``AdminRoute`` is how app.py declares one (a route missing from the table fails at
start-up); ``Access.require`` is the one check every admin handler makes.

Roles are ordered, each including the ones before it (``ROLES``): ``viewer`` reads, ``operator``
changes routing (policies and actions), ``admin`` changes what is loaded. A token may be scoped to
model names: it then acts only on a route's ``{model}`` (or the model a handler filters on, such
as the audit's ``?model=``) among them, and a route about no one model needs an unscoped token.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from starlette.requests import Request
from starlette.routing import Match, Route
from starlette.types import Scope

from gateway.errors import Forbidden
from gateway.http.auth import TokenAuth
from gateway.settings import ROLES, Grant, Role

REQUIRED: Mapping[tuple[str, str], Role] = {
    ("GET", "/admin/routes"): "viewer",
    ("GET", "/admin/routes/{model}"): "viewer",
    ("GET", "/admin/routes/{model}/report"): "viewer",
    ("GET", "/admin/routes/{model}/guards"): "viewer",
    ("GET", "/admin/audit"): "viewer",
    ("GET", "/admin/events"): "viewer",
    ("POST", "/v2/repository/index"): "viewer",
    ("GET", "/admin/limits"): "viewer",
    ("GET", "/admin/routes/{model}/rollout"): "viewer",
    ("PUT", "/admin/routes/{model}/rollout"): "operator",
    ("DELETE", "/admin/routes/{model}/rollout"): "operator",
    ("POST", "/admin/routes/{model}/actions/approve"): "operator",
    ("POST", "/admin/routes/{model}/actions/reject"): "operator",
    ("PUT", "/admin/routes/{model}"): "operator",
    ("DELETE", "/admin/routes/{model}"): "operator",
    ("POST", "/admin/routes/{model}/actions/{action}"): "operator",
    ("POST", "/v2/repository/models/{model}/load"): "admin",
    ("POST", "/v2/repository/models/{model}/unload"): "admin",
    ("PUT", "/admin/limits"): "admin",
}

_ROUTE = "turnout.admin_route"  # the scope key carrying the matched (method, path)
_UNSCOPED_ADMIN = Grant()  # a token configured as NAME=TOKEN


class AdminRoute(Route):
    """A route of the admin or repository API, for one method; its role is ``REQUIRED``'s."""

    def __init__(self, method: str, path: str, endpoint: Any) -> None:
        self.key = (method, path)
        self.role = REQUIRED[self.key]  # KeyError: give the new route its role in REQUIRED
        super().__init__(path, endpoint, methods=[method])

    def matches(self, scope: Scope) -> tuple[Match, Scope]:
        match, child = super().matches(scope)
        if match is not Match.NONE:
            child[_ROUTE] = self.key
        return match, child


class Access:
    def __init__(self, auth: TokenAuth, grants: Mapping[str, Grant]) -> None:
        self.auth = auth
        self.grants = grants

    def require(self, request: Request, model: str | None = None) -> str:
        """The name of the token presented (what the audit trail records), once it holds the
        role the route needs and may act on its model: the route's ``{model}``, else ``model``.
        Unauthorized (401) without a valid token, Forbidden (403) naming what is missing."""
        who = self.auth.authenticate(request.headers.get("authorization"))
        method, path = request.scope[_ROUTE]  # KeyError: the route is not an AdminRoute
        needed = REQUIRED[(method, path)]
        grant = self.grants.get(who, _UNSCOPED_ADMIN)
        if ROLES.index(grant.role) < ROLES.index(needed):
            raise Forbidden(
                f"{method} {path} needs the {needed} role; token {who!r} is a {grant.role}"
            )
        if grant.models is None:
            return who
        scope = "+".join(sorted(grant.models))
        model = request.path_params.get("model", model)
        if model is None:
            raise Forbidden(
                f"{method} {path} is not about one model: it needs an unscoped token; token "
                f"{who!r} is scoped to {scope}"
            )
        if model not in grant.models:
            raise Forbidden(f"token {who!r} may not act on model {model!r}: scoped to {scope}")
        return who
