"""Many builders on one remote: N mlbuild processes at once against one SeaweedFS S3 server.

Each builder has its own checkout and `.mlbuild/`; they build four
configurations of one pipeline (`--set scale=.. --set epochs=..`), so some
cache keys are shared by every builder, some by half, some by the two
builders of a configuration. Some builders are SIGKILLed right after one of
their steps finished (its upload under way), then run again. Afterwards every
checkout is compared byte for byte with a clean build of its configuration,
and every record on the remote is checked (its blobs exist and hash right);
then fresh checkouts restore everything. The run is tests/team.py's.

Writes the `## Many builders on one remote` section of bench/RESULTS.md.
Usage: python bench/team_bench.py [--quick]
"""

from __future__ import annotations

import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(BENCH))
sys.path.insert(0, str(ROOT))

import report  # noqa: E402

from tests.seaweed import BUCKET, SeaweedS3  # noqa: E402
from tests.team import LoadResult, copy_env, load_run  # noqa: E402

RESULTS_MD = BENCH / "RESULTS.md"
SECTION = "Many builders on one remote"


def main() -> int:
    quick = "--quick" in sys.argv
    builders, kills = (4, 1) if quick else (8, 3)
    work = Path(tempfile.mkdtemp(prefix="mlbuild-team-bench-"))
    try:
        with SeaweedS3(work / "seaweed") as s3:
            os.environ.update(s3.env())
            url = f"s3://{BUCKET}/team{time.time_ns()}"
            result = load_run(
                work,
                url,
                {"endpoint_url": s3.endpoint},
                copy_env(s3.env()),
                builders=builders,
                kills=kills,
                size=1_000_000,
                seed=int(time.time()),
            )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    body = render(result)
    print(body)
    ok = not result.wrong and not result.problems
    if not quick:
        report.replace_section(RESULTS_MD, SECTION, body, "mlbuild bench results")
    return 0 if ok else 1


def render(r: LoadResult) -> str:
    machine = f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}"
    first_ran = sum(x.ran for x in r.first)
    first_remote = sum(x.restored_remote for x in r.first)
    rerun_ran = sum(x.ran for x in r.reruns)
    rerun_remote = sum(x.restored_remote for x in r.reruns)
    rerun_local = sum(x.restored_local for x in r.reruns)
    fresh_ran = sum(x.ran for x in r.fresh)
    fresh_remote = sum(x.restored_remote for x in r.fresh)
    done_first = sum(x.ran + x.restored_remote + x.restored_local for x in r.first)
    ran_all = first_ran + rerun_ran + fresh_ran
    rows = [
        ["builders (processes at once, own checkout and `.mlbuild/`)", str(r.builders)],
        [
            "targets per pipeline; distinct cache keys over the configurations",
            f"{r.targets}; {r.keys}",
        ],
        ["builders SIGKILLed mid-upload (then run again)", str(r.kills)],
        [
            "round 1 (all at once): steps run / restored from the remote",
            f"{first_ran} / {first_remote}",
        ],
        [
            "round 1: wall time; throughput (targets brought up to date per second)",
            f"{r.seconds:.1f} s; {done_first / r.seconds:.1f}/s",
        ],
        [
            "killed builders run again: steps run / restored from remote / from local",
            f"{rerun_ran} / {rerun_remote} / {rerun_local}",
        ],
        [
            f"round 2 ({r.builders} fresh checkouts): steps run / restored from the remote",
            f"{fresh_ran} / {fresh_remote}",
        ],
        ["records on the remote (uploads that landed); distinct blobs", f"{r.records}; {r.blobs}"],
        [
            "steps run in all; over the distinct keys (duplicate work)",
            f"{ran_all}; {ran_all - r.keys}",
        ],
        [
            "steps not run thanks to the remote (restores, all rounds)",
            str(first_remote + rerun_remote + fresh_remote),
        ],
        ["outputs differing from a clean build (must be 0)", str(len(r.wrong))],
        ["records naming a missing or wrong blob (must be 0)", str(len(r.problems))],
    ]
    return "\n".join(
        [
            f"`python bench/team_bench.py` on {machine}; SeaweedFS (`weed mini`) on 127.0.0.1;"
            " every builder is `python -m mlbuild run -j 2` in its own checkout, started"
            " together, each with one of four configurations (`--set scale=.. --set"
            " epochs=..`) of one pipeline with 1 MB outputs and 0.1 s steps, so that some keys"
            " are shared by every builder, some by half and some by two. The killed builders"
            " got SIGKILL right after one of their steps finished (its background upload under"
            " way). Round 1's builders all start at an empty remote, so builders of one"
            " configuration run its steps side by side (nothing coordinates them: that is the"
            " duplicate work); later builds restore.",
            "",
            report._table(["", ""], rows),
            *(
                ["", "Problems: " + "; ".join(r.wrong + r.problems)]
                if r.wrong or r.problems
                else []
            ),
        ]
    )


if __name__ == "__main__":
    raise SystemExit(main())
