"""Envoy configs from the templates in the top-level ``envoy/`` folder: ``authz render envoy``.

``values`` checks what users type, ``templates`` fills the ``string.Template`` files (shared with
``devstack.envoy``), ``command`` is the CLI. Pure: no asyncio, grpc or network; ``authz.cli`` imports
``command`` only to register the subcommand.
"""
