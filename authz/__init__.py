"""Envoy ext_authz service for Apigee API keys and API products."""

__version__ = "0.1.0"
