"""`tinystory generate`: stream a story to stdout; the model, settings and speed go to stderr.

Three modes: a PROMPT (N samples streamed, separated by `---`), `--prompts-file` (JSON
Lines records), or no prompt on a terminal (type a beginning, get a story, until Ctrl-D).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from tinystory.cli.options import ConfigOpt, DeviceOpt, PrintSettingsOpt, ProfileOpt, RunArg, SeedOpt, SetOpt, resolve
from tinystory.errors import TinystoryError

if TYPE_CHECKING:
    from tinystory.generation import Generator
    from tinystory.sampling import SamplingParams

SEPARATOR = "\n---\n\n"  # between samples on stdout
SAMPLING = "Sampling"


class UsageError(TinystoryError):
    """Wrong use of the command line: one line, exit 2."""

    exit_code = 2


def _sampling(*names: str, help: str) -> Any:
    """A sampling option of `generate` (in its own help panel)."""
    return typer.Option(*names, help=help, show_default=False, rich_help_panel=SAMPLING)


PromptArg = Annotated[str | None, typer.Argument(
    help="Beginning of the story. Without one, on a terminal: type beginnings until Ctrl-D.", show_default=False)]
MaxNewOpt = Annotated[int | None, _sampling("--max-new-tokens", "-n", help="Token limit of a story (it stops "
                                                                          "earlier at EOS).")]
TemperatureOpt = Annotated[float | None, _sampling("--temperature", "-t", help="Sampling temperature (0 = greedy).")]
TopKOpt = Annotated[int | None, _sampling("--top-k", help="Keep the k likeliest tokens (0 = off).")]
TopPOpt = Annotated[float | None, _sampling("--top-p", help="Nucleus sampling (1.0 = off).")]
PenaltyOpt = Annotated[float | None, _sampling("--repetition-penalty", help="Penalise repeated tokens (1.0 = off).")]
SamplesOpt = Annotated[int | None, _sampling("--num-samples", help="Stories per prompt.")]
GreedyOpt = Annotated[bool, typer.Option("--greedy", help="Always take the likeliest token (deterministic).",
                                         rich_help_panel=SAMPLING)]
PromptsFileOpt = Annotated[Path | None, typer.Option(
    "--prompts-file", help="One prompt a line -> JSON Lines (prompt, story, settings, tokens).", show_default=False,
    dir_okay=False)]
OutOpt = Annotated[Path | None, typer.Option(
    "--out", "-o", help="Write the JSON Lines here (atomically) instead of stdout.", show_default=False,
    dir_okay=False)]
AllowEmptyOpt = Annotated[bool, typer.Option("--allow-empty", help="Accept an empty prompt: the story starts from "
                                             "nothing.")]
DtypeOpt = Annotated[str | None, typer.Option("--dtype", help="auto, fp32, bf16 or fp16.", show_default=False)]
ThreadsOpt = Annotated[int | None, typer.Option("--threads", help="CPU threads (0 = the measured best).",
                                                show_default=False)]


def generate(
    prompt: PromptArg = None,
    run: RunArg = None,
    max_new_tokens: MaxNewOpt = None,
    temperature: TemperatureOpt = None,
    top_k: TopKOpt = None,
    top_p: TopPOpt = None,
    repetition_penalty: PenaltyOpt = None,
    num_samples: SamplesOpt = None,
    seed: SeedOpt = None,
    greedy: GreedyOpt = False,
    prompts_file: PromptsFileOpt = None,
    out: OutOpt = None,
    allow_empty: AllowEmptyOpt = False,
    device: DeviceOpt = None,
    dtype: DtypeOpt = None,
    threads: ThreadsOpt = None,
    profile: ProfileOpt = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    print_settings: PrintSettingsOpt = False,
) -> None:
    """Tell a story: stream a continuation of PROMPT to stdout."""
    flags = {
        "generate.max_new_tokens": (max_new_tokens, "--max-new-tokens"),
        "generate.temperature": (temperature, "--temperature"),
        "generate.top_k": (top_k, "--top-k"),
        "generate.top_p": (top_p, "--top-p"),
        "generate.repetition_penalty": (repetition_penalty, "--repetition-penalty"),
        "generate.num_samples": (num_samples, "--num-samples"),
        "generate.seed": (seed, "--seed"),
        "generate.device": (device, "--device"),
        "generate.dtype": (dtype, "--dtype"),
        "generate.threads": (threads, "--threads"),
    }
    settings = resolve(profile, config, set_, flags=flags, print_only=print_settings, sections=["generate"])
    from tinystory.console import info
    from tinystory.errors import SettingsError
    from tinystory.generation import Generator
    from tinystory.sampling import SamplingParams

    # bad input fails before the slow model load
    prompts = _prompts(prompt, prompts_file, allow_empty)
    SamplingParams.from_settings(settings)
    g = settings.generate
    if g.num_samples < 1:
        raise SettingsError("num_samples must be at least 1", "e.g. --num-samples 3")
    gen = Generator.load(run, device=g.device, dtype=g.dtype, threads=g.threads, compile=g.compile)
    params = SamplingParams.from_settings(settings, gen.defaults, greedy=greedy or None)
    info(f"model {gen.describe()}")
    info(f"sampling {params.describe()}")
    try:
        if prompts is None:
            _interactive(gen, params, g.num_samples, allow_empty)
        elif prompts_file is not None or out is not None:
            _write_jsonl(gen, prompts, params, g.num_samples, allow_empty, out)
        else:
            _tell(gen, prompts[0], params, g.num_samples, allow_empty)
    except BrokenPipeError:  # the reader left (`| head`): stop quietly, as Unix tools do
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no error at exit's flush
        raise typer.Exit(0) from None


def _prompts(prompt: str | None, prompts_file: Path | None, allow_empty: bool) -> list[str] | None:
    """The prompts to use (None = interactive), checked before the model loads."""
    from tinystory.errors import DataError
    from tinystory.sampling import PromptError

    if prompts_file is not None:
        if prompt is not None:
            raise UsageError("give either a PROMPT or --prompts-file, not both", "drop one of them")
        if not prompts_file.is_file():
            raise DataError(f"prompts file {prompts_file} does not exist", "pass a text file with one prompt a line")
        lines = prompts_file.read_text(encoding="utf-8").splitlines()
        prompts = [p for p in lines if p.strip() or allow_empty]
        if not prompts:
            raise DataError(f"prompts file {prompts_file} holds no prompt", "write one prompt a line")
        return prompts
    if prompt is None:
        if not sys.stdin.isatty():
            raise UsageError(
                "no prompt given", 'pass one, e.g. tinystory generate "Once upon a time", or use --prompts-file'
            )
        return None
    if not prompt.strip() and not allow_empty:
        raise PromptError("the prompt is empty", 'type a beginning such as "Once upon a time", or pass --allow-empty')
    return [prompt]


def _sample_params(params: SamplingParams, i: int) -> SamplingParams:
    """Sample i of a run: seed + i, so each sample is reproducible on its own."""
    from dataclasses import replace

    return params if params.seed is None else replace(params, seed=params.seed + i)


def _stream_one(gen: Generator, prompt: str, params: SamplingParams, allow_empty: bool) -> None:
    """Print the prompt and the streamed continuation on stdout, flushed per piece."""
    from tinystory.console import info

    stream = gen.stream(prompt, params, allow_empty=allow_empty)
    sys.stdout.write(prompt.strip())
    sys.stdout.flush()
    for piece in stream:
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    sys.stdout.flush()
    seed = f", seed {stream.stats.seed}" if params.sampling else ""
    info(f"[dim]{stream.stats.describe()}{seed}[/dim]")


def _tell(gen: Generator, prompt: str, params: SamplingParams, num_samples: int, allow_empty: bool) -> None:
    for i in range(num_samples):
        if i:
            sys.stdout.write(SEPARATOR)
        _stream_one(gen, prompt, _sample_params(params, i), allow_empty)


def _interactive(gen: Generator, params: SamplingParams, num_samples: int, allow_empty: bool) -> None:
    """Read a beginning, tell a story, until Ctrl-D; Ctrl-C stops the story, not the loop."""
    from tinystory.console import info, warn
    from tinystory.sampling import PromptError

    info("type the beginning of a story and press Enter (Ctrl-D to quit)")
    while True:
        sys.stderr.write("> ")
        sys.stderr.flush()
        line = sys.stdin.readline()
        if not line:  # Ctrl-D
            sys.stderr.write("\n")
            return
        try:
            _tell(gen, line.rstrip("\n"), params, num_samples, allow_empty)
        except PromptError as e:
            warn(str(e))
        except KeyboardInterrupt:
            sys.stdout.write("\n")
            warn("stopped")


def _write_jsonl(
    gen: Generator, prompts: list[str], params: SamplingParams, num_samples: int, allow_empty: bool, out: Path | None
) -> None:
    """One record per story: to stdout as each finishes, or atomically to `out`."""
    import json

    from tinystory.console import info
    from tinystory.generation import records
    from tinystory.paths import write_atomic

    lines = []
    total = len(prompts) * num_samples
    for k, rec in enumerate(records(gen, prompts, params, num_samples, allow_empty)):
        info(f"[dim][{k + 1}/{total}] {rec['tokens']} tokens, {rec['tokens_per_s']:.1f} tok/s[/dim]")
        line = json.dumps(rec, ensure_ascii=False) + "\n"
        if out is None:
            sys.stdout.write(line)
            sys.stdout.flush()
        lines.append(line)
    if out is not None:
        write_atomic(out, "".join(lines))
        info(f"wrote {total} stories to {out}")
