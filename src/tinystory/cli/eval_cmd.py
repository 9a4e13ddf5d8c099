"""`tinystory eval RUN [RUN ...]`: flags -> settings -> `tinystory.evaluation.evaluate`."""

from __future__ import annotations

from typing import Annotated

import typer

from tinystory.cli.options import ConfigOpt, DeviceOpt, PrintSettingsOpt, ProfileOpt, RunArg, SeedOpt, SetOpt, resolve

RunsArg = Annotated[
    list[str] | None,
    typer.Argument(metavar="RUN...", show_default=False,
                   help="Run dirs, checkpoints or hub ids, compared side by side; default: the latest run."),
]
MetricsOpt = Annotated[
    str | None,
    typer.Option("--metrics", "-m", show_default=False,
                 help="Comma-separated: loss, ppl, bpb, distinct-n, self-bleu, rep-n, bleu, length, judge, or all "
                      "(all but judge; default: eval.metrics = loss,ppl,bpb)."),
]
DataOpt = Annotated[
    str | None,
    typer.Option("--data", help="Prepared-data folder; default: the one the run was trained on.", show_default=False),
]
SamplesOpt = Annotated[
    int | None, typer.Option("--num-samples", "-n", min=1, help="Stories generated for the text metrics.",
                                show_default=False),
]
MaxTokensOpt = Annotated[
    int | None, typer.Option("--max-tokens", min=0, help="Cap on validation tokens scored (0 = all).",
                                show_default=False),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout instead of the table.")]
JUDGE = "Judge (--metrics judge)"
JudgeUrlOpt = Annotated[
    str | None, typer.Option("--judge-url", help="OpenAI-compatible API of the judge, e.g. http://localhost:11434/v1.",
                             rich_help_panel=JUDGE, show_default=False),
]
JudgeModelOpt = Annotated[
    str | None, typer.Option("--judge-model", help="The judge's model name on that server, e.g. gpt-4o.",
                             rich_help_panel=JUDGE, show_default=False),
]
JudgeKeyEnvOpt = Annotated[
    str | None, typer.Option("--judge-key-env", metavar="NAME", rich_help_panel=JUDGE, show_default=False,
                             help="Environment variable holding the API key (default OPENAI_API_KEY; '' = none)."),
]
JudgeRepeatsOpt = Annotated[
    int | None, typer.Option("--judge-repeats", min=1, rich_help_panel=JUDGE, show_default=False,
                             help="Grade each story K times and report the judge's own spread (default 1)."),
]


def eval_(
    runs: RunsArg = None,
    run: RunArg = None,
    metrics: MetricsOpt = None,
    data: DataOpt = None,
    num_samples: SamplesOpt = None,
    max_tokens: MaxTokensOpt = None,
    seed: SeedOpt = None,
    json_: JsonOpt = False,
    device: DeviceOpt = None,
    judge_url: JudgeUrlOpt = None,
    judge_model: JudgeModelOpt = None,
    judge_key_env: JudgeKeyEnvOpt = None,
    judge_repeats: JudgeRepeatsOpt = None,
    profile: ProfileOpt = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    print_settings: PrintSettingsOpt = False,
) -> None:
    """Loss, perplexity, bits per byte, story diversity and an LLM judge's grades; saves <run>/eval.json."""
    settings = resolve(
        profile, config, set_,
        flags={
            "eval.metrics": (metrics, "--metrics"),
            "eval.data": (data, "--data"),
            "eval.num_samples": (num_samples, "--num-samples"),
            "eval.max_tokens": (max_tokens, "--max-tokens"),
            "eval.seed": (seed, "--seed"),
            "eval.device": (device, "--device"),
            "eval.judge_url": (judge_url, "--judge-url"),
            "eval.judge_model": (judge_model, "--judge-model"),
            "eval.judge_key_env": (judge_key_env, "--judge-key-env"),
            "eval.judge_repeats": (judge_repeats, "--judge-repeats"),
        },
        print_only=print_settings,
        sections=["eval"],
    )
    from tinystory.evaluation import evaluate, parse_metrics, table

    names = parse_metrics(settings.eval.metrics)  # a typo fails before any model loads
    refs: list[str | None] = [*(runs or []), *([run] if run else [])] or [None]  # --run as in the other commands
    results = [evaluate(ref, settings, names) for ref in refs]
    if json_:
        import json

        print(json.dumps(results[0] if len(results) == 1 else {"runs": results}, indent=2))
    else:
        from tinystory.console import out

        out().print(table(results))
