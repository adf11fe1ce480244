"""kvrt eval: long-context evaluation of cache specs side by side (LOOM-Scope's idea, arXiv 2507.04723)."""
