"""The pure decision core: no asyncio, grpc, httpx, prometheus or logging set-up.

Imports: the standard library and authz.errors only (enforced by tests/test_architecture.py).
"""
