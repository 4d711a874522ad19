"""MoE models: families (where experts, router and attention live), loading, tokenizers, upcycle, pretrain."""
