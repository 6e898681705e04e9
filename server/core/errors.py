"""Domain errors raised by the transport-free core; the service layer maps them to gRPC status codes."""


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
