"""The router: an HTTP front for OpenAI-compatible replicas behind their guards.

It routes each request to a ready replica, retries a request no replica started, and continues a
stream that a draining replica cuts on another replica. It never imports the guard (siblings).
"""
