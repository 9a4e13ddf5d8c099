"""Publishing a run to the Hugging Face Hub: assemble the upload folder, then one commit.

`push()` checks everything it can offline first (repo id, run dir, token), writes the
exact folder that will be uploaded (`RUN/hub-upload/`: weights, config, tokenizer,
settings, run summary, eval results, loss curve, a generated model card and, on request,
the quantized variants; never checkpoints, optimizer state or caches), then creates the
repo (`create_repo(exist_ok=True)`) and uploads the folder with one `upload_folder` call.

The token is passed to huggingface_hub and nowhere else: it is never printed, logged,
stored in settings or written to a file.

Failing fast: huggingface_hub 2.4's shared HTTP client has no timeout, and its preupload
and commit calls retry network errors 5 times with 1+2+4+8+8 s of sleeps. While pushing we
install a client with timeouts whose transport turns network errors into `HubUnreachable`
(not in huggingface_hub's retry list), after a 3 s TCP probe of the endpoint.
"""

from __future__ import annotations

import fnmatch
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from huggingface_hub import HfApi, get_token
from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled
from huggingface_hub.utils import HFValidationError, _http, set_client_factory, validate_repo_id

from tinystory import __version__
from tinystory.console import info
from tinystory.errors import HubError, OfflineError, RunError
from tinystory.modelcard import current_eval, model_card
from tinystory.net import endpoint, hub_offline, reachable
from tinystory.runs import Run

if TYPE_CHECKING:
    from tinystory.settings import PushSettings

STAGING = "hub-upload"  # the upload folder, written inside the run dir
MODEL_FILES = ("config.json", "generation_config.json", "model.safetensors", "model.safetensors.index.json")
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
    "added_tokens.json", "vocab.json", "merges.txt", "chat_template.jinja",
)
RUN_FILES = ("settings.toml", "run.json", "eval.json", "metrics.jsonl")
# Never uploaded from quantized/ either: training state, caches, partial files.
NEVER = ("checkpoint*", "optimizer*", "scheduler*", "rng_state*", "trainer_state.json", "training_args.bin",
         "__pycache__", ".*", "*.lock", "*.tmp", "*.incomplete", "*.pyc")

NO_TOKEN_HINT = "run `hf auth login` or set HF_TOKEN"
CONNECT_TIMEOUT_S = 10.0
READ_TIMEOUT_S = 120.0  # the commit call waits while the Hub writes the files


@dataclass(frozen=True)
class PushResult:
    """What `push` did: the upload folder, its files and, unless a dry run, where they went."""

    folder: Path
    files: list[tuple[str, int]]
    repo_id: str
    revision: str
    dry_run: bool
    repo_url: str = ""
    commit_url: str = ""


class HubUnreachable(OSError):
    """A network error while talking to the Hub (raised instead of retried)."""


# ---------------------------------------------------------------- offline checks


def check_repo_id(repo_id: str) -> str:
    """`repo_id` if it is a valid `namespace/name` model repo id, else HubError."""

    try:
        validate_repo_id(repo_id)
    except HFValidationError as e:
        raise HubError(f"invalid repo id {repo_id!r}: {str(e).split(':')[0]}", "use namespace/name, e.g. "
                       "your-name/tinystories-3m") from None
    if "/" not in repo_id:
        raise HubError(f"invalid repo id {repo_id!r}: it needs a namespace",
                       f"use namespace/name, e.g. your-name/{repo_id}")
    return repo_id


def find_token(token: str | None) -> str:
    """The token from `--token`, else HF_TOKEN, else the saved login; HubError if none."""
    if token and token.strip():
        return token.strip()

    found = get_token()
    if not found:
        raise HubError("no Hugging Face token found", NO_TOKEN_HINT)
    return found


# ------------------------------------------------------------ the upload folder


def _skipped(relpath: Path) -> bool:
    return any(fnmatch.fnmatch(part, pat) for part in relpath.parts for pat in NEVER)


def upload_sources(run: Path, include_quantized: bool) -> list[tuple[Path, str]]:
    """(local file, path in repo) for every file of `run` that is uploaded, sorted."""

    names = [*MODEL_FILES, *TOKENIZER_FILES, *RUN_FILES]
    if (run / "eval.json").is_file() and current_eval(run) is None:
        names.remove("eval.json")  # made for other weights: its numbers would be wrong here
    files = [(run / n, n) for n in names if (run / n).is_file()]
    files += [(p, p.name) for p in run.glob("model-*-of-*.safetensors")]  # sharded weights
    files += [(p, p.name) for p in run.glob("*.png") if not _skipped(Path(p.name))]  # the loss curve
    if (run / "README.md").is_file():
        files.append((run / "README.md", "README.md"))  # the user's own card wins
    if include_quantized:
        qdir = run / "quantized"
        quant = [p for p in sorted(qdir.rglob("*")) if p.is_file() and not _skipped(p.relative_to(qdir))]
        if not quant:
            raise RunError(f"no quantized variants in {qdir}", "run `tinystory quantize` first, or drop "
                           "--include-quantized")
        files += [(p, p.relative_to(run).as_posix()) for p in quant]
    return sorted(files, key=lambda f: f[1])


def _link_or_copy(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)  # no second copy of the weights
    except OSError:
        shutil.copy2(src, dst)


def stage(run: Path, repo_id: str, include_quantized: bool = False) -> Path:
    """Write `RUN/hub-upload/`, exactly what will be uploaded (replaced atomically)."""

    sources = upload_sources(run, include_quantized)
    final = run / STAGING
    tmp = Path(tempfile.mkdtemp(prefix=f".{STAGING}-", dir=run))
    try:
        for src, rel in sources:
            _link_or_copy(src, tmp / rel)
        if not (tmp / "README.md").exists():
            info("writing the model card (README.md) ...")
            quantized = [rel for _, rel in sources if rel.startswith("quantized/")]
            text = model_card(run, repo_id, quantized_files=quantized)
            (tmp / "README.md").write_text(text, encoding="utf-8")
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def file_list(folder: Path) -> list[tuple[str, int]]:
    """(path relative to `folder`, size in bytes) of every file under it, sorted."""
    return sorted((p.relative_to(folder).as_posix(), p.stat().st_size) for p in folder.rglob("*") if p.is_file())


def format_size(n: int) -> str:
    """Bytes as a short human size (1000-based, like the Hub shows them)."""
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000  # type: ignore[assignment]
    return f"{n} B"  # pragma: no cover


# ---------------------------------------------------------------------- network


def _http_module() -> Any:
    """The httpx flavour huggingface_hub uses (httpx2 in 2.x, httpx in 1.x)."""
    return getattr(_http, "httpx2", None) or vars(_http)["httpx"]


@contextmanager
def fail_fast_http() -> Iterator[None]:
    """huggingface_hub's requests get timeouts, and network errors are not retried."""

    httpx = _http_module()
    hooks = [h for h in [getattr(_http, "hf_request_event_hook", None)] if h]

    class FailFast(httpx.HTTPTransport):  # type: ignore[name-defined]  # httpx is httpx2 or httpx, found at run time
        def handle_request(self, request: Any) -> Any:
            try:
                return super().handle_request(request)
            except httpx.TransportError as e:  # connect/read errors, timeouts, dropped connections
                raise HubUnreachable(f"{type(e).__name__} from {request.url.host}") from None

    def factory() -> Any:
        timeout = httpx.Timeout(READ_TIMEOUT_S, connect=CONNECT_TIMEOUT_S)
        return httpx.Client(event_hooks={"request": hooks}, follow_redirects=True, timeout=timeout,
                            transport=FailFast())

    previous = getattr(_http, "_GLOBAL_CLIENT_FACTORY", None) or _http.default_client_factory
    set_client_factory(factory)
    try:
        yield
    finally:
        set_client_factory(previous)


@contextmanager
def hub_errors(repo_id: str, revision: str) -> Iterator[None]:
    """Map huggingface_hub / network failures to one-line HubError / OfflineError."""

    try:
        yield
    except HfHubHTTPError as e:
        raise _http_error(e, repo_id, revision) from None
    except OfflineModeIsEnabled:
        raise OfflineError("cannot push: HF_HUB_OFFLINE is set", "unset it, or use --dry-run") from None
    except HubUnreachable as e:
        raise OfflineError(f"lost the connection to the Hugging Face Hub ({endpoint()}): {e}",
                           "check your network and push again") from None
    except ValueError as e:
        if "Invalid metadata in README.md" not in str(e):
            raise
        detail = "; ".join(line.lstrip("- ") for line in str(e).splitlines()[1:] if line.strip())
        raise HubError(f"the Hub rejected the metadata of README.md: {detail}",
                       "fix its YAML front matter, or delete the run's README.md to get a generated card") from None


def _http_error(e: Any, repo_id: str, revision: str) -> HubError:
    status = e.response.status_code if e.response is not None else 0
    if status == 401:
        return HubError("the Hub rejected the token (401 Unauthorized)",
                        f"it may be revoked or mistyped: {NO_TOKEN_HINT} with a valid one")
    if status == 403:
        name = repo_id.split("/")[-1]
        return HubError(f"no write access to {repo_id} (403 Forbidden): the namespace belongs to someone else "
                        "or the token is read-only", f"push to your-name/{name}, or use a token with write access")
    if status == 404:
        return HubError(f"{repo_id} (revision {revision}) was not found on the Hub (404 Not Found)",
                        "check the repo id and --revision")
    server = (getattr(e, "server_message", "") or "").strip().splitlines()
    return HubError(f"the Hub answered {status} while pushing to {repo_id}" + (f": {server[0]}" if server else ""),
                    "try again later")


def _upload(folder: Path, repo_id: str, settings: PushSettings, token: str, message: str) -> tuple[str, str]:
    """create_repo (exist_ok) + the branch if needed + one upload_folder commit."""

    api = HfApi(endpoint=endpoint(), library_name="tinystory-llm", library_version=__version__)
    info(f"creating {repo_id} on {endpoint()} if it does not exist ...")
    url = api.create_repo(repo_id, token=token, private=settings.private or None, exist_ok=True)
    if settings.revision != "main":
        api.create_branch(repo_id, branch=settings.revision, token=token, exist_ok=True)
    info(f"uploading {folder} to {repo_id} (revision {settings.revision}) ...")
    commit = api.upload_folder(repo_id=repo_id, folder_path=folder, token=token, revision=settings.revision,
                               commit_message=message)
    return str(url), str(commit.commit_url)


def push(run_ref: str | Path | None, repo_id: str, settings: PushSettings, token: str | None = None,
         dry_run: bool = False) -> PushResult:
    """Publish a run dir to `repo_id` (one commit), or with `dry_run` only write the upload folder."""

    check_repo_id(repo_id)
    run = Run.trained(run_ref).path
    if dry_run:
        folder = stage(run, repo_id, settings.include_quantized)
        return PushResult(folder, file_list(folder), repo_id, settings.revision, dry_run=True)
    secret = find_token(token)
    if hub_offline():
        raise OfflineError("cannot push: HF_HUB_OFFLINE is set", "unset it, or use --dry-run to prepare the upload")
    if not reachable():
        raise OfflineError(f"cannot reach the Hugging Face Hub ({endpoint()})",
                           "check your network, or use --dry-run to prepare the upload offline")
    folder = stage(run, repo_id, settings.include_quantized)
    message = settings.commit_message or f"Upload {run.name} (tinystory-llm {__version__})"
    with fail_fast_http(), hub_errors(repo_id, settings.revision):
        repo_url, commit_url = _upload(folder, repo_id, settings, secret, message)
    return PushResult(folder, file_list(folder), repo_id, settings.revision, dry_run=False,
                      repo_url=repo_url, commit_url=commit_url)
