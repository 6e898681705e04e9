"""Domain errors raised by the transport-free core; the service layer maps them to gRPC status codes."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Iterable


class ChronorecError(Exception):
    """Base of all errors a caller can act on; the message is safe to return to the caller."""

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class InvalidArgument(ChronorecError):
    """The request is malformed or out of bounds."""


class NotFound(ChronorecError):
    """A named entity (item, user, model version) does not exist."""


class Overloaded(ChronorecError):
    """A bounded queue or concurrency limit is full; the caller should back off and retry."""


class Unavailable(ChronorecError):
    """The component is not ready or a resource (database, model) is temporarily unusable."""


class FailedPrecondition(ChronorecError):
    """The system is not in a state where the operation can run (e.g. a swap already in progress)."""


def redact_paths(text: str, roots: Iterable[str | os.PathLike] = ()) -> str:
    """`text` without the server's absolute paths, for messages a caller sees (a read token is
    enough for GetStatus). Each of `roots`, as given or resolved, becomes `<name>` after its last
    part (`<models>/encoder/v1/model.onnx`); any other quoted absolute path on this machine
    becomes '<path>' (graph node names such as '/embeddings/Gather' are not paths and stay)."""
    names: dict[str, str] = {}
    for root in roots:
        path = Path(root)
        for form in {str(path), str(path.resolve())}:
            if form not in ("", "/", "."):
                names[form] = f"<{path.name or 'root'}>"
    for form in sorted(names, key=len, reverse=True):
        text = text.replace(form, names[form])

    def quoted(match: re.Match) -> str:
        first = Path("/", *Path(match.group(2)).parts[1:2])
        return f"{match.group(1)}<path>{match.group(1)}" if first != Path("/") and first.exists() else match.group(0)

    return re.sub(r"(['\"])(/[^'\"]*)\1", quoted, text)
