"""Apigee analytics: records from access logs and denied checks, staged as gzip NDJSON and uploaded."""
