"""Standalone mode: products and API keys from a local catalog file instead of Apigee."""
