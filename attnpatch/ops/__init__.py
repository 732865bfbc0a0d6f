"""Numeric helpers both methods and kernels use: log-sum-exp merging of partial attention (``lse``) and
the fused Triton tile pooling of the block-score estimators (``triton_pool``). They import neither."""
