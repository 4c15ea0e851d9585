"""The four scenarios; each takes a `Ctx` and returns a JSON-ready dict."""
