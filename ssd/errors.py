"""Request errors of the core, typed so every front end maps them to a status by type, not text:
ValueError subclasses are the client's fault (gRPC INVALID_ARGUMENT / HTTP 400), except
ContextTooLong (RESOURCE_EXHAUSTED / HTTP 413-like "too long")."""


class RequestError(ValueError):
    """A request the engine refuses because of what it asks for."""


class ContextTooLong(RequestError):
    """Prompt (plus output) longer than the engine's context length."""
