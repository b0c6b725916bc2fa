"""cvt_fast benchmarks (run as scripts: python bench/attn.py ...)."""
