"""Placeholder while the command is built (replaced by its issue's work)."""

from __future__ import annotations

from tinystory.cli.options import ConfigOpt, PrintSettingsOpt, ProfileOpt, SetOpt, resolve


def quantize(profile: ProfileOpt = None, config: ConfigOpt = None, set_: SetOpt = None,
        print_settings: PrintSettingsOpt = False) -> None:
    """Not built yet."""
    resolve(profile, config, set_, print_only=print_settings)
    from tinystory.errors import TinystoryError

    raise TinystoryError("this command is not built yet")
