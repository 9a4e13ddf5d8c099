"""Mutation testing of the core modules (issue #37): mutmut 3 changes one operator, number
or string at a time in the modules where a wrong number would go unnoticed, runs the fast
tests of that module against each change, and counts the changes no test noticed.

    pip install -e ".[dev]"                      # brings mutmut
    nice -n 10 python tools/mutation.py          # every module below, one after the other
    python tools/mutation.py metrics memory      # some of them
    python tools/mutation.py metrics --keep      # keep the work folder (`mutmut show NAME` there)

Each module runs in a fresh temporary copy of src/, tests/ and pyproject.toml (with a
[tool.mutmut] table added), so mutmut's `mutants/` folder never lands in the repo, and
with one worker (`--max-children 1`) at nice 10, so it yields to other work. mutmut runs, for
each mutant, only the tests of the module's list that call the mutated function, with
`-x -q -p no:cacheprovider`. The summary (per module: mutants, killed, survived, timeouts,
score, and every survivor with its diff) goes to benchmarks/results/mutation-<cpu>.json.

Not mutated by mutmut 3 (its rules, not ours): module-level constants, class bodies, and
functions under a decorator other than @classmethod/@staticmethod (properties).

Not part of CI and not collected by pytest (it lives in tools/). On a 2-core AMD EPYC a
module takes 1 to 25 minutes (metrics 1, scoring 2, sampling 2, runs 4, settings 10 to 17,
evaluation 24, memory 25).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from _common import cpu_id, cpu_name  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"

# module -> (the fast test files that pin it, tests left out: too slow per mutant, or
# they run the command in a subprocess, which imports the unmutated package)
MODULES: dict[str, tuple[list[str], list[str]]] = {
    "metrics": (["tests/test_metrics.py", "tests/test_core_metrics.py"], []),
    "scoring": (["tests/test_core_scoring.py"], []),
    "evaluation": (["tests/test_core_evaluation.py"], []),
    "runs": (["tests/test_core_runs.py"], []),
    "settings": (["tests/test_settings.py", "tests/test_core_settings.py"], []),
    "sampling": (["tests/test_core_sampling.py"], []),
    "memory": (["tests/test_memory.py", "tests/test_core_memory.py"],
               ["tests/test_memory.py::test_step_peak_matches_torch"]),  # 14 s of real training steps
}

# Survivors no test can kill: the mutant computes the same thing (checked by reading the
# code, reason given). Names are mutmut's; they stay the same while the module is unchanged.
EQUIVALENT: dict[str, str] = {
    # metrics.self_bleu
    "tinystory.metrics.x_self_bleu__mutmut_5": "BLEU(effective_order=None): the object only lends its tokenizer, "
                                               "order and smoothing; compute_bleu gets effective_order=True itself",
    "tinystory.metrics.x_self_bleu__mutmut_6": "BLEU(effective_order=False): as _5",
    "tinystory.metrics.x_self_bleu__mutmut_36": "default owner -1 -> +1: a new n-gram always takes the `c > 0` branch, "
                                                "so the default's owner is never read",
    "tinystory.metrics.x_self_bleu__mutmut_37": "default owner -1 -> -2: as _36",
    "tinystory.metrics.x_self_bleu__mutmut_38": "default second 0 -> 1: as _36, the default's second is never read",
    "tinystory.metrics.x_self_bleu__mutmut_42": "c > best -> c >= best: on a tie both branches store (c, ?, c), and "
                                                "every text then gets min(c, c)",
    "tinystory.metrics.x_self_bleu__mutmut_69": "always `second`: for a text that is not the owner, its own count <= "
                                                "second <= best, so min(c, second) == min(c, best) == c",
    "tinystory.metrics.x_self_bleu__mutmut_89": "smooth_value=None: it is None for the exp smoothing BLEU uses",
    "tinystory.metrics.x_self_bleu__mutmut_97": "smooth_value left out: its default is None, as _89",
    "tinystory.metrics.x_self_bleu__mutmut_99": "max_ngram_order left out: its default 4 is BLEU's order",
    # scoring: where tensors go. On a CPU (the only device the suite runs on) .to(None) leaves
    # them where they are, exactly like .to("cpu"); tests/test_cuda.py covers CUDA
    "tinystory.scoring.x_score_blocks__mutmut_73": "x.to(None) instead of x.to(device): the same on a CPU",
    "tinystory.scoring.x_score_blocks__mutmut_104": "targets.to(None) instead of the logits' device: the same on a CPU",
    "tinystory.scoring.x_score_stream__mutmut_21": "device None passed on: the same on a CPU",
    # sampling
    "tinystory.sampling.xǁHFTokenizerMixinǁencode__mutmut_2": "encode('') is [] too: the guard only saves a call",
    # evaluation: where tensors go, as in scoring (a device left out defaults to "cpu")
    "tinystory.evaluation.x_continue_prompts__mutmut_60": "torch.tensor(device=None) is on the CPU: the same on a CPU",
    "tinystory.evaluation.x_continue_prompts__mutmut_62": "device left out: as _60",
    "tinystory.evaluation.x_continue_prompts__mutmut_69": "as _60, for the attention mask",
    "tinystory.evaluation.x_continue_prompts__mutmut_71": "as _62, for the attention mask",
    "tinystory.evaluation.x_evaluate__mutmut_114": "loss_metrics(device=None): score_stream's tensors stay on the "
                                                   "CPU, the same on a CPU",
    "tinystory.evaluation.x_evaluate__mutmut_207": "judge_metric(device=None): continue_prompts' tensors stay on "
                                                   "the CPU, the same on a CPU",
    "tinystory.evaluation.x_judge_metric__mutmut_11": "continue_prompts(device=None): the same on a CPU",
    "tinystory.evaluation.x_judge_metric__mutmut_17": "continue_prompts' device left out: its default is 'cpu'",
    "tinystory.evaluation.x_loss_metrics__mutmut_14": "score_stream(device=None): the same on a CPU",
    "tinystory.evaluation.x_loss_metrics__mutmut_20": "score_stream's device left out: the same on a CPU",
    # evaluation: the rest
    "tinystory.evaluation.x_val_stories__mutmut_6": "a 128 Ki-token read chunk instead of 64 Ki: the same stories "
                                                    "(the chunk only bounds how much is read at once)",
    "tinystory.evaluation.x_val_stories__mutmut_7": "as _6",
    "tinystory.evaluation.x_val_stories__mutmut_9": "len(out) <= limit: the slice ends[: limit - len(out)] is empty "
                                                    "then, so the extra chunks add nothing",
    "tinystory.evaluation.x_val_stories__mutmut_10": "pos <= len(tokens): one more pass over an empty chunk",
    "tinystory.evaluation.x__cut_text__mutmut_7": "at exactly `limit` tokens both give the text: the cut text is the "
                                                  "decoded ids, and the byte-level BPE decodes them to the same text",
    "tinystory.evaluation.x_parse_metrics__mutmut_17": "get_close_matches puts the best match first whatever n, and "
                                                       "only close[0] is shown",
    "tinystory.evaluation.x_parse_metrics__mutmut_18": "as _17",
    "tinystory.evaluation.x_save_eval__mutmut_7": "encoding=None is the locale's, UTF-8 here (as runs.read_json)",
    "tinystory.evaluation.x_save_eval__mutmut_9": "'UTF-8' and 'utf-8' name the same codec",
    "tinystory.evaluation.x_save_eval__mutmut_10": "old = '' after unreadable JSON: as falsy as None, so nothing "
                                                   "merges either way",
    "tinystory.evaluation.x_table__mutmut_81": "rich reads style names case-blind: 'DIM' is 'dim'",
    "tinystory.evaluation.x_table__mutmut_85": "a result's reference keys are always among its metrics keys "
                                               "(evaluate makes the reference row for the metrics it computed, and "
                                               "save_eval merges both groups alike), so `present` is the same",
    "tinystory.evaluation.x_table__mutmut_89": "as _85",
    "tinystory.evaluation.x_table__mutmut_90": "as _85",
    "tinystory.evaluation.x_table__mutmut_135": "rich pads a row that has fewer cells than columns with empty cells: "
                                                "the trailing '' cells only say so",
    "tinystory.evaluation.x_table__mutmut_152": "as _135",
    "tinystory.evaluation.x_table__mutmut_164": "as _135",
    "tinystory.evaluation.x_table__mutmut_171": "as _135",
    # settings
    "tinystory.settings.xǁSettingsǁget__mutmut_5": "split('.') without a limit: a setting name has one dot "
                                                  "(section.key; unknown names are refused first), so every split "
                                                  "gives the same two parts",
    "tinystory.settings.xǁSettingsǁget__mutmut_6": "rsplit: as _5",
    "tinystory.settings.xǁSettingsǁget__mutmut_8": "split limit 2: as _5",
    "tinystory.settings.x_explain__mutmut_5": "as Settings.get _5",
    "tinystory.settings.x_explain__mutmut_6": "as Settings.get _6",
    "tinystory.settings.x_explain__mutmut_8": "as Settings.get _8",
    "tinystory.settings.x_explain__mutmut_10": "every field is made by setting(), which always stores a `why`, so "
                                               "the default of .get('why', ...) is never used",
    "tinystory.settings.x_explain__mutmut_12": "as _10",
    "tinystory.settings.x_explain__mutmut_16": "as _10",
    "tinystory.settings.x_read_profile__mutmut_7": "encoding=None is the locale's, UTF-8 here (as runs.read_json)",
    "tinystory.settings.x_read_profile__mutmut_10": "'UTF-8' and 'utf-8' name the same codec",
    "tinystory.settings.x_read_profile__mutmut_19": "get_close_matches puts the best match first whatever n, and "
                                                    "only close[0] is shown",
    "tinystory.settings.x_read_profile__mutmut_20": "as _19",
    "tinystory.settings.x_read_profile__mutmut_32": "as _7, for a shipped profile",
    "tinystory.settings.x_read_profile__mutmut_38": "as _10, for a shipped profile",
    "tinystory.settings.x_print_settings__mutmut_36": "rich reads style names case-blind: 'BOLD' is 'bold'",
    "tinystory.evaluation.x_table__mutmut_33": "rich renders a justify of None or an unknown name as its default, left",
    "tinystory.evaluation.x_table__mutmut_35": "as _33, for the caption",
    "tinystory.evaluation.x_table__mutmut_42": "as _33",
    "tinystory.evaluation.x_table__mutmut_43": "as _33",
    "tinystory.evaluation.x_table__mutmut_44": "as _35",
    "tinystory.evaluation.x_table__mutmut_45": "as _35",
    "tinystory.evaluation.x_table__mutmut_51": "a column's overflow None is rich's default, fold",
    "tinystory.settings.x_print_settings__mutmut_3": "as evaluation.table _33: rich renders it left",
    "tinystory.settings.x_print_settings__mutmut_6": "as _3",
    "tinystory.settings.x_print_settings__mutmut_7": "as _3",
    "tinystory.settings.x_print_settings__mutmut_17": "a column's overflow None (or an unknown name) is rich's "
                                                      "default, fold",
    "tinystory.settings.x_print_settings__mutmut_20": "as _17",
    "tinystory.settings.x_print_settings__mutmut_21": "as _17",
    "tinystory.settings.x__coerce__mutmut_78": "int() itself reads '1_000' (PEP 515), so the replace changes "
                                               "nothing",
    "tinystory.settings.x__coerce__mutmut_79": "'1XXXX000' fails int(), then float('1_000') (PEP 515 too) gives "
                                               "1000.0, an integer: the same value",
    "tinystory.settings.x__check_key__mutmut_16": "get_close_matches puts the best match first whatever n, and "
                                                  "only close[0] is shown",
    "tinystory.settings.x__check_key__mutmut_18": "as _16",
    "tinystory.settings.x__check_key__mutmut_26": "only close[0] is shown",
    "tinystory.settings.x__apply__mutmut_33": "as _check_key _16",
    "tinystory.settings.x__apply__mutmut_35": "as _check_key _16",
    "tinystory.settings.x__flatten__mutmut_9": "unreachable (pragma: no cover): _check_key raises first for any "
                                               "bare key, a section name included (it has no key)",
    "tinystory.settings.x__read_config__mutmut_9": "encoding=None is the locale's, UTF-8 here (as runs.read_json)",
    "tinystory.settings.x__read_config__mutmut_11": "'UTF-8' and 'utf-8' name the same codec",
    "tinystory.settings.x_load_settings__mutmut_43": "a shipped profile's name has no dot or slash, so its stem is "
                                                     "itself",
    "tinystory.settings.x_load_settings__mutmut_82": "no section or key name holds '__', so the first and the last "
                                                     "'__' of TINYSTORY_SECTION__KEY are the same",
    # runs
    "tinystory.runs.x_read_json__mutmut_3": "encoding=None is the locale's, UTF-8 on every machine we test on (a "
                                            "Latin-1 locale would misread non-ASCII JSON; not settable in-process)",
    "tinystory.runs.x_read_json__mutmut_5": "'UTF-8' and 'utf-8' name the same codec",
    "tinystory.runs.x_rotate_checkpoints__mutmut_20": "keep >= 0: at keep 0, complete[:-0] is complete[:0], empty",
    "tinystory.runs.xǁRunǁweights_sha256__mutmut_18": "read(None) reads the file at once: the same hash",
    "tinystory.runs.xǁRunǁweights_sha256__mutmut_20": "a 2 MiB read size: the same hash",
    "tinystory.runs.xǁRunǁweights_sha256__mutmut_21": "a 2 MiB read size: the same hash",
    # memory
    "tinystory.memory.x__optimizer_state__mutmut_18": "a tied head adds a matrix of 0 values: 0 bytes either way "
                                                      "(0 is below bitsandbytes' 8-bit minimum, so it lands in the "
                                                      "32-bit part, again as 0)",
    "tinystory.memory.x__options_at__mutmut_31": "mid = (lo + hi + 2) // 2 still lies in (lo, hi] whenever lo < hi, so "
                                                 "the bisection ends on the same largest batch (only the order of its "
                                                 "probes changes)",
    "tinystory.memory.x__options_at__mutmut_44": "tokens / T: tokens % T == 0 is checked first, so n is a whole number "
                                                 "and n % d == 0 holds for the same divisors",
    "tinystory.memory.x__options_at__mutmut_68": "the reason is a placeholder: _suggest, the only caller, replaces it "
                                                 "with _reason() for the option it returns",
    "tinystory.memory.x__options_at__mutmut_76": "as _68",
    "tinystory.memory.x__suggest__mutmut_3": "for an integer x, x / 2 >= 64 and x // 2 >= 64 both mean x >= 128",
    "tinystory.memory.x_plan__mutmut_7": "the default is read only for a config that names no attention: any default "
                                         "other than the setting copies the config and sets the setting, which plans "
                                         "what the config's own default (sdpa) plans",
    "tinystory.memory.x_plan__mutmut_13": "as _7",
    "tinystory.memory.x_plan__mutmut_14": "as _7",
    "tinystory.memory.x_plan__mutmut_17": "a shallow copy: the attention is set on the copy, the caller's config keeps "
                                          "its own (the test checks it), and the plan only reads the copy",
    "tinystory.memory.x_render__mutmut_129": "a title justify of None or an unknown name prints the title at the "
                                             "left edge too: only the trailing spaces that 'left' pads it with "
                                             "differ, which a terminal never shows",
    "tinystory.memory.x_render__mutmut_132": "as _129",
    "tinystory.memory.x_render__mutmut_133": "as _129",
    "tinystory.memory.x_render__mutmut_136": "a column's unknown justify renders exactly as left (same text)",
    "tinystory.memory.x_render__mutmut_137": "as _136",
    "tinystory.memory.x_render__mutmut_148": "as _136",
    "tinystory.memory.x_render__mutmut_149": "as _136",
    "tinystory.memory.x_render__mutmut_176": "rich renders a None cell as an empty one",
    "tinystory.memory.x_render__mutmut_189": "rich reads style names case-blind: 'BOLD' is 'bold'",
    "tinystory.memory.x_render__mutmut_204": "as _176",
    "tinystory.memory.x_render__mutmut_225": "as _176",
    "tinystory.memory.x_render__mutmut_226": "as _176",
    "tinystory.memory.x_render__mutmut_230": "rich pads a row that has fewer cells than columns with empty cells (as "
                                             "evaluation.table _135)",
    "tinystory.memory.x_render__mutmut_231": "as _230",
    "tinystory.memory.x_render__mutmut_239": "as _189",
    "tinystory.memory.x_render__mutmut_242": "as _176",
    "tinystory.memory.x_render__mutmut_263": "as _129, for the caption",
    "tinystory.memory.x_render__mutmut_264": "as _129, for the caption",
    "tinystory.memory.x_render__mutmut_265": "as _129, for the caption",
    "tinystory.memory.xǁ_Shapeǁof__mutmut_47": "the default is only compared with 'eager': '', None and 'XXXX' all "
                                               "differ from it",
    "tinystory.memory.xǁ_Shapeǁof__mutmut_53": "as _47",
}

# mutmut's exit codes (mutmut/stats.py); "no tests": no selected test calls the function
STATUS = {1: "killed", 3: "killed", 0: "survived", 5: "no tests", 33: "no tests", 34: "skipped",
          36: "timeout", -24: "timeout", 24: "timeout", 152: "timeout", 255: "timeout", 37: "type check",
          -11: "segfault", -9: "segfault"}


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def cpu_slug() -> str:
    """'AMD EPYC' + family 23 model 1 -> 'amd-epyc-f23m1'."""
    fm = re.fullmatch(r"family (\d+) model (\d+)", cpu_id())
    return slug(cpu_name()) + (f"-f{fm[1]}m{fm[2]}" if fm else "")


def mutmut_config(module: str, tests: list[str], deselect: list[str]) -> str:
    selection = [*tests, *(arg for t in deselect for arg in ("--deselect", t))]
    return "\n".join([
        "", "[tool.mutmut]",
        'source_paths = ["src"]',
        f'only_mutate = ["src/tinystory/{module}.py"]',
        'pytest_add_cli_args = ["-p", "no:cacheprovider"]',  # mutmut adds -x -q
        f"pytest_add_cli_args_test_selection = {json.dumps(selection)}",
        'process_isolation = "forkserver"',  # torch is not fork-safe after it has run
        "use_git_change_detection = false",
        "",
    ])


def prepare_workdir(module: str) -> Path:
    """A temporary copy of what the tests need, with mutmut's table in pyproject.toml."""
    work = Path(tempfile.mkdtemp(prefix=f"mutation-{module}-"))
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info", ".pytest_cache")
    shutil.copytree(ROOT / "src", work / "src", ignore=ignore)
    shutil.copytree(ROOT / "tests", work / "tests", ignore=ignore)
    tests, deselect = MODULES[module]
    pyproject = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    (work / "pyproject.toml").write_text(pyproject + mutmut_config(module, tests, deselect), encoding="utf-8")
    return work


def mutmut_exe() -> str:
    exe = Path(sys.executable).parent / "mutmut"
    if not exe.exists():
        sys.exit("mutmut is not installed: pip install -e '.[dev]'")
    return str(exe)


def run_module(module: str, keep: bool) -> dict:
    work = prepare_workdir(module)
    print(f"== {module}: {work}", flush=True)
    start = time.perf_counter()
    log = work / "mutmut.log"
    with open(log, "w", encoding="utf-8") as f:
        rc = subprocess.run([mutmut_exe(), "run", "--max-children", "1"], cwd=work, stdout=f,
                            stderr=subprocess.STDOUT).returncode
    seconds = time.perf_counter() - start
    meta = work / "mutants" / "src" / "tinystory" / f"{module}.py.meta"
    if rc != 0 or not meta.is_file():
        tail = log.read_text(encoding="utf-8", errors="replace")[-3000:]
        raise SystemExit(f"mutmut failed on {module} (exit {rc}), work folder {work}:\n{tail}")
    codes = json.loads(meta.read_text(encoding="utf-8"))["exit_code_by_key"]
    status = {name: STATUS.get(code, "suspicious") for name, code in codes.items()}
    counts: dict[str, int] = {}
    for s in status.values():
        counts[s] = counts.get(s, 0) + 1
    detected = counts.get("killed", 0) + counts.get("timeout", 0)
    survivors = {}
    for name in sorted(n for n, s in status.items() if s not in ("killed", "timeout")):
        diff = subprocess.run([mutmut_exe(), "show", name], cwd=work, capture_output=True, text=True).stdout
        survivors[name] = {"status": status[name], "diff": _diff_lines(diff), "equivalent": EQUIVALENT.get(name)}
    stale = sorted(n for n in EQUIVALENT if n.startswith(f"tinystory.{module}.") and n not in survivors)
    if stale:
        print(f"   listed as equivalent but killed or gone (check the list): {', '.join(stale)}", flush=True)
    equivalent = sum(1 for v in survivors.values() if v["equivalent"])
    result = {"mutants": len(status), "killed": counts.get("killed", 0), "timeout": counts.get("timeout", 0),
              "survived": len(status) - detected, "equivalent": equivalent, "by_status": counts,
              "score": round(100 * detected / len(status), 1) if status else None,
              "score_without_equivalent": (round(100 * detected / (len(status) - equivalent), 1)
                                           if len(status) > equivalent else None),
              "seconds": round(seconds), "tests": MODULES[module][0], "deselected": MODULES[module][1],
              "survivors": survivors}
    print(f"   {len(status)} mutants, {detected} killed ({result['score']}%), {len(survivors)} survived "
          f"({equivalent} equivalent), {seconds / 60:.1f} min", flush=True)
    if keep:
        print(f"   kept {work}", flush=True)
    else:
        shutil.rmtree(work, ignore_errors=True)
    return result


def _diff_lines(diff: str) -> list[str]:
    """The changed lines of `mutmut show`'s diff."""
    return [line for line in diff.splitlines()
            if line[:1] in "+-" and not line.startswith(("+++", "---"))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("modules", nargs="*", help=f"some of {', '.join(MODULES)} (default: all)")
    ap.add_argument("--keep", action="store_true", help="keep each module's work folder")
    ap.add_argument("--out", type=Path, default=None, help="JSON summary (default benchmarks/results/...)")
    args = ap.parse_args()
    unknown = [m for m in args.modules if m not in MODULES]
    if unknown:
        ap.error(f"unknown module {unknown[0]!r}: use some of {', '.join(MODULES)}")
    os.nice(10)  # other work on the machine (a benchmark) comes first
    modules = args.modules or list(MODULES)
    out = args.out or RESULTS / f"mutation-{cpu_slug()}.json"
    summary = json.loads(out.read_text(encoding="utf-8")) if out.is_file() else {}
    summary.update(cpu=cpu_name(), cpu_id=cpu_id(), cores=os.cpu_count(), python=sys.version.split()[0])
    summary["mutmut"] = subprocess.run([mutmut_exe(), "--version"], capture_output=True, text=True).stdout.strip()
    summary.setdefault("modules", {})
    start = time.perf_counter()
    for module in modules:
        summary["modules"][module] = run_module(module, args.keep)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    print(f"\n{'module':<12}{'mutants':>8}{'killed':>8}{'timeout':>8}{'survived':>9}{'equiv.':>7}{'score':>8}"
          f"{'min':>6}")
    for name, r in summary["modules"].items():
        print(f"{name:<12}{r['mutants']:>8}{r['killed']:>8}{r['timeout']:>8}{r['survived']:>9}{r['equivalent']:>7}"
              f"{r['score']:>7}%{r['seconds'] / 60:>6.1f}")
    print(f"\n{len(modules)} modules in {(time.perf_counter() - start) / 60:.1f} min; wrote {out}")


if __name__ == "__main__":
    main()
