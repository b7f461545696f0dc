"""Fuzz every decoder of peer bytes once, at scale: 100,000 cases per decoder by default.

The cases are those of the CI fuzz suite (``tests/decoder_fuzzing.py``): one in ten is random
bytes, the rest a valid message mutated (bit flips, byte edits, truncation, extension,
insertion, deletion, duplication, length-field edits, .npy header edits, JSON field edits,
SecAgg replays), all from one seeded generator. The valid messages themselves hold fresh
keys, sessions and tokens (cryptographic randomness is never seeded), so the counts of the
SecAgg and enrolment decoders vary slightly from run to run; the others repeat exactly. Each case
either decodes, raises the decoder's documented error (ProtocolError; SecurityError for
tokens and enrolment; RoundFailedError when a coordinator stage has too few clients left),
or raises something else: a bug. Writes ``benchmarks/results/fuzz_decoders.json`` and
``.md`` and exits 1 if any case raised something else.

    OMP_NUM_THREADS=1 python benchmarks/fuzz_decoders.py [--cases 100000] [--seed 12]
"""

from __future__ import annotations

import argparse
import collections
import json
import logging
import os
import platform
import random
import sys
import time
import traceback
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
for path in (ROOT, ROOT / "tests"):  # run from a checkout without `pip install -e .`
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

from decoder_fuzzing import DECODERS, decoder, run_case  # noqa: E402

RESULTS = HERE / "results"


def fuzz(name: str, *, cases: int, seed: int) -> dict[str, Any]:
    """Run ``cases`` cases of one decoder; outcome counts and the first undocumented errors."""
    dec = decoder(name)
    rng = random.Random(f"{seed}:{name}")
    counts: collections.Counter[str] = collections.Counter()
    by_source: collections.Counter[str] = collections.Counter()
    others: dict[str, dict[str, Any]] = {}
    start = time.perf_counter()
    for i in range(cases):
        if i % 10 == 0:
            source, case = "random", dec.from_bytes(rng.randbytes(rng.randrange(601)))
        else:
            source, case = "mutation", dec.generate(rng)
        try:
            outcome = run_case(dec, case)
        except Exception as exc:  # noqa: BLE001 - counting them is the point
            outcome = "other"
            key = f"{type(exc).__module__}.{type(exc).__name__}"
            if key not in others:
                frame = traceback.extract_tb(exc.__traceback__)[-1]
                others[key] = {"count": 0, "first_case": i, "message": str(exc)[:200],
                               "where": f"{Path(frame.filename).name}:{frame.lineno}",
                               "case": repr(case)[:300]}
            others[key]["count"] += 1
        counts[outcome] += 1
        by_source[f"{source}:{outcome}"] += 1
    seconds = time.perf_counter() - start
    return {"decoder": name, "what": dec.notes,
            "documented_errors": [e.__name__ for e in dec.documented], "cases": cases,
            "decoded": counts["decoded"], "documented": counts["documented"],
            "other": counts["other"], "by_source": dict(sorted(by_source.items())),
            "others": others, "seconds": round(seconds, 2),
            "cases_per_second": round(cases / seconds) if seconds else None}


def _markdown(report: dict[str, Any]) -> str:
    lines = [
        "# Decoder fuzzing: every decoder of peer bytes",
        "",
        f"`{report['command']}` (seed {report['seed']}, {report['cases_per_decoder']:,} cases "
        f"per decoder, one in ten random bytes, the rest mutated valid messages), "
        f"{report['machine']}, {report['finished']}"
        f"{'' if report['complete'] else ' (INCOMPLETE: interrupted)'}.",
        "",
        "| decoder | decoded | documented error | other | s | documented errors |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for r in report["decoders"]:
        lines.append(f"| {r['decoder']} | {r['decoded']:,} | {r['documented']:,} | "
                     f"{r['other']:,} | {r['seconds']} | {', '.join(r['documented_errors'])} |")
    lines += ["", f"Total other (undocumented) exceptions: **{report['total_other']}**.", "",
              "The mutations are seeded; the SecAgg and enrolment messages they start from hold "
              "fresh keys, sessions and tokens (never seeded), so those counts vary slightly "
              "between runs.", ""]
    for r in report["decoders"]:
        lines.append(f"- **{r['decoder']}**: {r['what']}")
        for key, info in r["others"].items():
            lines.append(f"  - OTHER {key} x{info['count']} at {info['where']}: "
                         f"{info['message']} (first case {info['first_case']})")
    return "\n".join(lines) + "\n"


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


def main(argv: list[str] | None = None) -> int:
    """Run the fuzzers, write the results, exit 1 on any undocumented exception."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", type=int, default=100_000, help="cases per decoder")
    parser.add_argument("--seed", type=int, default=12)
    parser.add_argument("--decoders", nargs="*", choices=DECODERS, default=list(DECODERS))
    parser.add_argument("--out", type=Path, default=RESULTS / "fuzz_decoders")
    args = parser.parse_args(argv)
    # every excluded SecAgg client is a logged warning: millions of lines otherwise
    logging.disable(logging.WARNING)
    command = "python benchmarks/fuzz_decoders.py" + "".join(
        f" {a}" for a in (argv if argv is not None else sys.argv[1:]))
    results: list[dict[str, Any]] = []
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for name in args.decoders:
        r = fuzz(name, cases=args.cases, seed=args.seed)
        results.append(r)
        print(f"{name:18s} decoded {r['decoded']:>7,}  documented {r['documented']:>7,}  "
              f"other {r['other']:>3}  {r['seconds']:7.1f} s", flush=True)
        # written after every decoder: an interrupted run keeps what it measured
        report = {"command": command, "seed": args.seed, "cases_per_decoder": args.cases,
                  "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, Python "
                             f"{platform.python_version()}",
                  "finished": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
                  "complete": len(results) == len(args.decoders),
                  "total_other": sum(r["other"] for r in results), "decoders": results}
        _write(args.out.with_suffix(".json"), json.dumps(report, indent=2) + "\n")
        _write(args.out.with_suffix(".md"), _markdown(report))
    print(f"total other: {report['total_other']}; wrote {args.out}.json/.md")
    return 1 if report["total_other"] else 0


if __name__ == "__main__":
    sys.exit(main())
