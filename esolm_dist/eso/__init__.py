"""The Eso-LM algorithm in plain torch (arXiv 2506.01928): no distribution, no model code.

schedule   noise schedule alpha_t, its derivative, the ELBO weight, antithetic t
orders     diffusion and sequential orders (sort indices) and their inverses
masks      attention-mask specs for Eso-LM (A) and (B), diffusion and sequential inputs
rows       a batch of sequences -> the hybrid-loss model input (rows of 2L tokens)
loss       the hybrid loss from per-token log-likelihoods
likelihood exact log p(x) for one order and the importance-weighted bound over K orders
sampling   the first-hitting schedule and the KV-cached sampler
"""

# The samplers of sampling.sample, named here (not in sampling.py, which needs torch) so that the
# command line lists them without importing torch.
METHODS = ("eso", "mdlm", "ar")
