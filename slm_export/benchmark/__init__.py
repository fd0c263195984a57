"""What the benchmark suite in ``bench/`` measures with and writes: the comparison primitive,
roofline math and memory probes (``measure``), the results file (``results``), its tables
(``report``) and charts (``plots``). Nothing here runs a model; ``bench/`` does.

``python -m slm_export.benchmark FILE`` prints a results file's tables; ``--plot DIR`` draws
its charts; ``--update PAGE.md`` rebuilds a page's generated tables.
"""

from slm_export.benchmark.measure import (
    SETTLE_S,
    WEIGHT_BYTES,
    Rounds,
    RssPeak,
    bytes_per_decode_step,
    cuda_used_mb,
    decode_weight_params,
    gain,
    interleaved,
    measure_read_bandwidth,
    order,
    roofline_pct,
    roofline_tokens_per_s,
    spread,
    sync,
)
from slm_export.benchmark.report import (
    TABLES,
    comparisons_table,
    find_gain,
    markdown_table,
    regenerate,
    results_table,
    serving_table,
    summary_table,
)
from slm_export.benchmark.results import (
    RESULT_FIELDS,
    Comparison,
    Result,
    check_results,
    comparison_gain,
    git_commit,
    load_results,
    machine_info,
    write_results,
)

__all__ = [
    "RESULT_FIELDS", "SETTLE_S", "TABLES", "WEIGHT_BYTES", "Comparison", "Result", "Rounds",
    "RssPeak", "bytes_per_decode_step", "check_results", "comparison_gain", "comparisons_table",
    "cuda_used_mb", "decode_weight_params", "find_gain", "gain", "git_commit", "interleaved", "load_results",
    "machine_info", "markdown_table", "measure_read_bandwidth", "order", "regenerate",
    "results_table", "roofline_pct", "roofline_tokens_per_s", "serving_table", "spread",
    "summary_table", "sync",
    "write_results",
]
