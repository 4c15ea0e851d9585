"""The scenarios; each takes a `Ctx` and returns a JSON-ready dict."""
