"""The operator commands besides `serve`: `check-config` and `tune`, and the flags they share."""

__all__: list[str] = []
