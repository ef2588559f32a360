"""HTTP surface of the gateway."""

from vilms.serve.api.app import create_app

__all__ = ["create_app"]
