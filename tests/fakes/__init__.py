"""Stateful fakes of the systems around the service, shared by every test level (STYLE.md guideline 8).

Keep this file free of imports so that `python -m tests.fakes.apigee` runs without a runpy warning.
"""
