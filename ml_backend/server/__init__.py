"""The web layer: ``create_app(settings)`` (Flask), served by gunicorn in production."""

from ml_backend.server.app import create_app

__all__ = ["create_app"]
