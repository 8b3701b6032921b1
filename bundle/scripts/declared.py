"""Components as ``configs/inference.yaml`` declares them, for code that runs without the bundle's config (tests,
benchmarks, a runner built in Python): the config stays their one declaration."""

from __future__ import annotations

from monai.bundle import ConfigParser


def declared(key: str, **overrides: object) -> object:
    """``inference.yaml``'s ``key``, instantiated, with the config keys in ``overrides`` set first (e.g.
    ``working_size``)."""
    from . import BUNDLE_ROOT  # the package's root module imports the modules that call this one

    parser = ConfigParser()
    parser.read_config(f"{BUNDLE_ROOT}/configs/inference.yaml")
    for name, value in overrides.items():
        parser[name] = value
    return parser.get_parsed_content(key)
