"""`tinystory serve [RUN]`: the story page and an OpenAI-compatible API (tinystory.serve)."""

from __future__ import annotations

from typing import Annotated

import typer

from tinystory.cli.options import ConfigOpt, DeviceOpt, PrintSettingsOpt, ProfileOpt, SetOpt, resolve

RunPos = Annotated[
    str | None,
    typer.Argument(help="Run dir, checkpoint, int8 folder, .gguf file or hub id; default: the latest run.",
                   show_default=False),
]
HostOpt = Annotated[
    str | None,
    typer.Option("--host", help="Address to bind (default 127.0.0.1: this machine only; 0.0.0.0 = everyone).",
                 show_default=False),
]
PortOpt = Annotated[int | None, typer.Option("--port", help="TCP port (default 8000; 0 = any free one).",
                                                show_default=False)]


def serve(
    run: RunPos = None,
    host: HostOpt = None,
    port: PortOpt = None,
    device: DeviceOpt = None,
    profile: ProfileOpt = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    print_settings: PrintSettingsOpt = False,
) -> None:
    """Serve a model: a web page at / and an OpenAI-compatible API at /v1. Ctrl-C stops it.

    Sampling defaults (for requests that omit them, and the page's knobs) and the device,
    dtype and threads come from the generate settings, e.g. --set generate.temperature=0.8.
    """
    settings = resolve(profile, config, set_, flags={"serve.host": (host, "--host"), "serve.port": (port, "--port"),
                                                       "generate.device": (device, "--device")},
                       print_only=print_settings, sections=["serve", "generate"])
    from tinystory.serve import require_extra, run_server

    require_extra()  # before the slow model load
    from tinystory.generation import Generator
    from tinystory.sampling import SamplingParams

    g = settings.generate
    generator = Generator.load(run, device=g.device, dtype=g.dtype, threads=g.threads, compile=g.compile)
    defaults = SamplingParams.from_settings(settings, generator.defaults)
    run_server(generator, defaults, settings.serve.host, settings.serve.port)
