"""One spawn of 2 gloo ranks runs the jobs of every TP=2 equality test
module (tests/parallel/test_tp_*.py), and one process the same jobs at
TP=1: each module's ``results`` fixture takes its share."""
from __future__ import annotations

import pytest

from tests.parallel.harness import run_job, run_parallel


@pytest.fixture(scope="session")
def tp_runs(tmp_path_factory) -> dict[str, tuple[list, list, list]]:
    """module -> (its jobs, [rank][job] results at TP=2, results at TP=1)."""
    from tests.parallel.test_tp_family import family_jobs
    from tests.parallel.test_tp_llada import llada_jobs

    groups = {"llada": llada_jobs(tmp_path_factory.mktemp("tp")), "family": family_jobs()}
    jobs = [job for group in groups.values() for job in group]
    tp = run_parallel(jobs)
    single = [run_job(job, None) for job in jobs]
    out, start = {}, 0
    for name, group in groups.items():
        end = start + len(group)
        out[name] = (group, [rank[start:end] for rank in tp], single[start:end])
        start = end
    return out
