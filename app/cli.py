"""Operator commands: ``flask --app wsgi chat ...``."""

from flask import Flask


def init_app(app: Flask) -> None:
    """Register the ``chat`` command group."""
