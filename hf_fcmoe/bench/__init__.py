"""`hf-fcmoe bench`: methods x alphas x seeds on the same partitions and base, compared per seed."""

from hf_fcmoe.bench.config import BenchConfig, load_bench_config
from hf_fcmoe.bench.runner import run_bench

__all__ = ["BenchConfig", "load_bench_config", "run_bench"]
