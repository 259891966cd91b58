"""The operator console: HTML pages under /admin/ for keys, guardrails, usage, the audit log and the core.

Server-rendered (Jinja2, autoescaped), plain forms, no JavaScript; the edge serves it beside the REST API.
"""
