"""The ``vrpc`` pytest entry point: loads the fixtures only when a project asks for them.

An entry point is loaded into every pytest run of the environment, so this module only adds the
``vrpc_fixtures`` setting; the fixtures themselves come from ``vrpc.testing.pytest_plugin``.
"""

from __future__ import annotations

import pytest

_PLUGIN = "vrpc.testing.pytest_plugin"


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addini(
        "vrpc_fixtures",
        type="bool",
        default=False,
        help="load vrpc's testing fixtures (vrpc_client, vrpc_services, ...)",
    )


def pytest_configure(config: pytest.Config) -> None:
    if config.getini("vrpc_fixtures") and not config.pluginmanager.has_plugin(_PLUGIN):
        config.pluginmanager.import_plugin(_PLUGIN)
