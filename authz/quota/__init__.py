"""Quotas: buckets per quota identifier, enforced in memory and synced with Apigee."""
