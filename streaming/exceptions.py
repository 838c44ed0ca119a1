"""A chat request the gateway will not send upstream; the API edge answers it with a 400."""

from __future__ import annotations


class InvalidApiRequest(Exception):
    def __init__(self, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code
