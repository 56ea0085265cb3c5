"""Our hostile end-to-end cases against vLLM's built-in with the upstream series applied.

Why: the series of ``upstream/`` claims to fix defects of vLLM's built-in prompt_embeds chat
support; this sends every case of ``benchmarks/hostile_side_by_side.py`` (which holds those of
``tests/hostile_cases.py``) to ``vllm serve`` with the plugin off (``VLLM_PLUGINS=""``) over the
patched vLLM of ``build/upstream/site`` (``tools/upstream_check.py`` builds it and sets
``PYTHONPATH``), and checks: the server is alive and answers the probe chat unchanged after
*every* case (zero engine deaths), and each case in ``CLAIMS`` gets the status (and message
fragment) the series promises. Exit status 1 on any failure.

    PYTHONPATH=build/upstream/site VLLM_PLUGINS= .venv-vllm033/bin/python tools/upstream_hostile.py
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
sys.path.insert(1, str(REPO))

import hostile_side_by_side as side  # noqa: E402  (puts tests/ on sys.path via common)
from common import ManagedServer, build_tiny_model, vllm_cache_root  # noqa: E402

# Part cases vLLM 0.33 itself refuses, with a message that names no part.
REFUSED_BY_VLLM = (
    "not_a_tensor_file", "pickled_dict", "exploit_pickle", "one_dim", "three_dim", "wrong_width",
    "int_dtype", "bool_dtype", "complex_dtype", "sparse_huge", "stride_trick_huge", "data_empty",
)  # fmt: skip
# case -> (status, fragment of the message or reply, the patch that claims it)
CLAIMS: dict[str, tuple[int, str, str]] = {
    "echo_with_part": (200, "pt=", "0001"),
    "prompt_logprobs_with_part": (200, "pt=", "0001"),
    "stream_echo_with_part": (200, "stream ok", "0001+0004"),
    "stream_echo_text_list": (200, "stream ok", "0004"),
    "nan": (400, "finite values", "0003"),
    "inf": (400, "finite values", "0003"),
    "data_missing": (400, "requires a non-empty `data`", "0005"),
    "data_null": (400, "requires a non-empty `data`", "0005"),
    "data_number": (400, "must be a string of base64", "0005"),
    "not_base64": (400, "not valid base64", "0005"),
    "zero_rows": (400, "at least one row", "0005"),
    "uuid_number": (400, "do not support `uuid`", "0005"),
    # Every part with a uuid, whatever its value or data: refused by name, not "Missing 'type'".
    "uuid_list": (400, "do not support `uuid`", "0005"),
    "uuid_object": (400, "do not support `uuid`", "0005"),
    "uuid_empty": (400, "do not support `uuid`", "0005"),
    "uuid_empty_alone": (400, "do not support `uuid`", "0005"),
    "uuid_huge": (400, "do not support `uuid`", "0005"),
    "uuid_long": (400, "do not support `uuid`", "0005"),
    "uuid_unknown": (400, "do not support `uuid`", "0005"),
    # The plugin serves parts by reference; the built-in has none and says so.
    "uuid_with_data_control": (400, "do not support `uuid`", "0005"),
    # Refused by vLLM itself; 0015 names the part (the hostile cases put it second).
    **{name: (400, "(parameter=messages[0].content[1]", "0015") for name in REFUSED_BY_VLLM},
    "reserved_in_text": (400, "reserved placeholder", "(before the series)"),
    "reserved_in_name": (400, "`name` may not contain", "0006"),
    "reserved_in_reasoning": (400, "`reasoning` may not contain", "0006"),
    "reserved_in_tool_arguments": (400, "`tool_calls[0].function.arguments`", "0006"),
    "reserved_in_tool_arguments_with_part": (
        400,
        "`tool_calls[0].function.arguments`",
        "0006",
    ),
    "beam_search_with_part": (200, "pt=", "0011"),
    "valid_control": (200, "pt=", "(control)"),
}


def check(cases: list[side.Case], results: dict[str, side.Result]) -> list[str]:
    failures = []
    for case in cases:
        result = results[case.name]
        if not (result.alive_after and result.probe_unchanged):
            failures.append(f"{case.name}: engine died or probe changed ({result.detail})")
        claim = CLAIMS.get(case.name)
        if claim is None:
            continue
        status, fragment, patch = claim
        if result.status != status or fragment not in result.detail:
            failures.append(
                f"{case.name} [{patch}]: expected {status} with {fragment!r}, "
                f"got {result.status} {result.detail[:200]!r}"
            )
    return failures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="*", help="case names (default: all)")
    args = parser.parse_args()
    side.exit_on_sigterm()
    site = os.environ.get("PYTHONPATH", "").split(os.pathsep)[0]
    if not (Path(site) / "vllm" / "renderers").is_dir():
        raise SystemExit("PYTHONPATH must start with the patched tree (tools/upstream_check.py)")
    model = build_tiny_model()
    cases = side.build_cases(side.EmbeddingTable(model))
    if args.only:
        cases = [c for c in cases if c.name in args.only]
    missing = sorted(set(CLAIMS) - {c.name for c in side.build_cases(side.EmbeddingTable(model))})
    if missing:
        raise SystemExit(f"claimed cases not in the benchmark: {missing}")
    with vllm_cache_root() as cache_root:
        managed = ManagedServer("builtin", model, cache_root)
        results = side.run_flavour(managed, cases)
    failures = check(cases, results)
    print(f"\nrestarts: {managed.restarts}; cases: {len(cases)}; claimed: "
          f"{sum(c.name in CLAIMS for c in cases)}")  # fmt: skip
    for case in cases:
        r = results[case.name]
        print(f"  {case.name:40} {r.status} alive={r.alive_after} {r.message[:70]}")
    for failure in failures:
        print(f"FAIL {failure}")
    print("upstream_hostile:", "PASS" if not failures else f"{len(failures)} failure(s)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
