"""Protocol error codes (PROTOCOL §2) and the exception that carries them."""
from typing import Any

BAD_FRAME = "bad_frame"
FRAME_TOO_LARGE = "frame_too_large"
UNKNOWN_OP = "unknown_op"
INVALID = "invalid"
NOT_FOUND = "not_found"
ALREADY_STARTED = "already_started"
CONFLICT = "conflict"
PERMISSION_DENIED = "permission_denied"
UNAVAILABLE = "unavailable"
INTERNAL = "internal"

CODES = frozenset({BAD_FRAME, FRAME_TOO_LARGE, UNKNOWN_OP, INVALID, NOT_FOUND, ALREADY_STARTED,
                   CONFLICT, PERMISSION_DENIED, UNAVAILABLE, INTERNAL})


class ProtocolError(Exception):
    """An error answered to a client as {"code", "message", "details"?}."""

    def __init__(self, code: str, message: str, details: Any = None) -> None:
        super().__init__("%s: %s" % (code, message))
        self.code = code
        self.message = message
        self.details = details

    def to_wire(self) -> dict:
        err = {"code": self.code, "message": self.message}
        if self.details is not None:
            err["details"] = self.details
        return err


MAX_ECHO = 200   # characters of client-supplied text echoed back in an error


def clip(text: str) -> str:
    """Client-supplied text shortened for an error, so a response never grows with the input."""
    return text if len(text) <= MAX_ECHO else text[:MAX_ECHO] + "..."


def invalid(field: str, message: str) -> ProtocolError:
    """An `invalid` error naming the dotted path of the offending field."""
    return ProtocolError(INVALID, clip(message) if len(message) > 4 * MAX_ECHO else message,
                         {"field": clip(field)})
