"""`tinystory train`: flags -> settings -> `tinystory.training.train`; prints the run dir."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from tinystory.cli.options import ConfigOpt, DeviceOpt, PrintSettingsOpt, ProfileOpt, SetOpt, resolve
from tinystory.settings import PRECISIONS

LIMITS = "Length (pick at most one)"


def train(
    profile: ProfileOpt = None,
    data: Annotated[Path | None, typer.Option("--data", "-d", help="Prepared-data folder (`tinystory prepare`).",
                                                 file_okay=False, show_default=False)] = None,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Run dir to write (or to resume).",
                                                file_okay=False, show_default=False)] = None,
    max_steps: Annotated[int | None, typer.Option("--max-steps", min=1, help="Optimizer steps.",
                                                     rich_help_panel=LIMITS, show_default=False)] = None,
    max_tokens: Annotated[int | None, typer.Option("--max-tokens", min=1, help="Training tokens.",
                                                      rich_help_panel=LIMITS, show_default=False)] = None,
    minutes: Annotated[float | None, typer.Option("--minutes", min=0.01, help="Wall time; the LR schedule is "
                                                  "fitted to it.", rich_help_panel=LIMITS, show_default=False)] = None,
    target_bpb: Annotated[float | None, typer.Option("--target-bpb", min=0.01, help="Stop at the first evaluation "
                                                     "at or below this bits per byte on the whole validation split "
                                                     "(with a length flag as a cap).", show_default=False)] = None,
    device: DeviceOpt = None,
    precision: Annotated[str | None, typer.Option("--precision", help=f"One of {', '.join(PRECISIONS)} "
                                                     "(auto: by device; on CPU a measured probe).",
                                                     show_default=False)] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the latest checkpoint of --out "
                                         "(else of the newest run).")] = False,
    init_from: Annotated[str | None, typer.Option("--init-from", help="Start from this run's (or hub model's) "
                                                     "weights: fine-tuning.", show_default=False)] = None,
    wandb: Annotated[bool | None, typer.Option("--wandb/--no-wandb", help="Log to Weights & Biases "
                                                  "(offline when not logged in).", show_default=False)] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the memory plan and exit.")] = False,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    print_settings: PrintSettingsOpt = False,
) -> None:
    """Train a model on prepared data; prints the run dir on stdout."""
    limits = [(name, v) for name, v in (("--max-steps", max_steps), ("--max-tokens", max_tokens),
                                        ("--minutes", minutes)) if v is not None]
    if len(limits) > 1:
        raise typer.BadParameter(f"{limits[0][0]} and {limits[1][0]} cannot be used together")
    flags: dict[str, tuple[Any, str]] = {
        "train.data": (str(data) if data else None, "--data"),
        "train.out": (str(out) if out else None, "--out"),
        "train.target_bpb": (target_bpb, "--target-bpb"),
        "train.device": (device, "--device"),
        "train.precision": (precision, "--precision"),
        "train.wandb": (None if wandb is None else ("on" if wandb else "off"), "--wandb"),
    }
    if limits:  # one length flag replaces whatever length the profile had set
        flag = limits[0][0]
        flags.update({"train.max_steps": (max_steps or 0, flag), "train.max_tokens": (max_tokens or 0, flag),
                      "train.minutes": (float(minutes or 0.0), flag)})
    settings = resolve(profile, config, set_, flags=flags, print_only=print_settings, sections=["model", "data",
                                                                                                "train"])
    from tinystory.callbacks import process_start
    from tinystory.training import train as run_training

    run_dir = run_training(settings, resume=resume, init_from=init_from, dry_run=dry_run, started=process_start())
    if run_dir is not None:
        import os

        if int(os.environ.get("RANK", 0)) == 0:
            print(run_dir)
