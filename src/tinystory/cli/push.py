"""`tinystory push RUN REPO_ID`: publish a run to the Hugging Face Hub with a model card."""

from __future__ import annotations

from typing import Annotated

import typer

from tinystory.cli.options import ConfigOpt, PrintSettingsOpt, ProfileOpt, SetOpt, resolve


def push(
    run: Annotated[str, typer.Argument(
        metavar="RUN", help="Run dir to publish (`latest` = the most recent run).", show_default=False)],
    repo_id: Annotated[str, typer.Argument(
        metavar="REPO_ID", help="Hub model repo, namespace/name; created if it does not exist.", show_default=False)],
    private: Annotated[bool | None, typer.Option("--private", help="Create the repo as private.")] = None,
    token: Annotated[str | None, typer.Option(
        "--token", help="Hub token with write access; default: HF_TOKEN, else the saved `hf auth login`.",
        show_default=False)] = None,
    include_quantized: Annotated[bool | None, typer.Option(
        "--include-quantized", help="Also upload the run's quantized/ variants (GGUF files too).")] = None,
    revision: Annotated[str | None, typer.Option(
        "--revision", help="Branch to commit to (created if missing); default: main.", show_default=False)] = None,
    commit_message: Annotated[str | None, typer.Option(
        "--commit-message", "-m", help="Commit message; default: a generated one.", show_default=False)] = None,
    dry_run: Annotated[bool, typer.Option(
        "--dry-run", help="Only write the folder that would be uploaded and list it; no network, no token.")] = False,
    profile: ProfileOpt = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    print_settings: PrintSettingsOpt = False,
) -> None:
    """Publish a run to the Hugging Face Hub: weights, tokenizer, settings, eval results and a model card."""
    settings = resolve(profile, config, set_, flags={
        "push.private": (private, "--private"),
        "push.include_quantized": (include_quantized, "--include-quantized"),
        "push.revision": (revision, "--revision"),
        "push.commit_message": (commit_message, "--commit-message"),
    }, print_only=print_settings, sections=["push"])
    from tinystory import hub
    from tinystory.console import info

    result = hub.push(run, repo_id, settings.push, token=token, dry_run=dry_run)
    total = sum(size for _, size in result.files)
    width = max(len(name) for name, _ in result.files)
    print(f"{result.folder}/")
    for name, size in result.files:
        print(f"  {name:<{width}}  {hub.format_size(size):>9}")
    print(f"{len(result.files)} files, {hub.format_size(total)}")
    if result.dry_run:
        info(f"dry run: nothing was uploaded; this folder is what one commit to {repo_id} "
             f"(revision {result.revision}) would hold")
    else:
        print(result.commit_url)
        info(f"pushed to {result.repo_url}")
