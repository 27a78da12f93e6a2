"""The Eso-LM algorithm in plain torch (arXiv 2506.01928): no distribution, no model code.

schedule   noise schedule alpha_t, its derivative, the ELBO weight, antithetic t
orders     diffusion and sequential orders (sort indices) and their inverses
masks      attention-mask specs for Eso-LM (A) and (B), diffusion and sequential inputs
rows       a batch of sequences -> the hybrid-loss model input (rows of 2L tokens)
loss       the hybrid loss from per-token log-likelihoods
likelihood exact log p(x) for one order and the importance-weighted bound over K orders
sampling   the first-hitting schedule, the KV-cached sampler and the baselines' samplers
baselines  the baselines' training rows (AR, MDLM, BD3-LM) and the rows of any eso.model
"""

# The models one network can be trained as (eso.model; config.json "model" of an export):
# esolm: Eso-LM (A)/(B); ar: shift-by-one causal LM; mdlm: bidirectional masked diffusion (alpha0 = 1);
# bd3lm: block diffusion with block size L' (eso.block_size).
MODELS = ("esolm", "ar", "mdlm", "bd3lm")

# The samplers of sampling.sample and the model each one samples, named here (not in sampling.py,
# which needs torch) so that the command line lists them without importing torch:
# eso    Eso-LM, paper Alg. 2 + 3: one KV cache over both phases ((A): cache in the sequential phase)
# ar     one token per step left to right, KV cache (NFE = L)
# mdlm   T first-hitting steps, each a full bidirectional forward over all L positions, no cache
# bd3lm  blocks of L' left to right, T / (L / L') diffusion steps per block, finished blocks in the KV cache
METHODS = {"eso": "esolm", "ar": "ar", "mdlm": "mdlm", "bd3lm": "bd3lm"}
DEFAULT_METHOD = {model: method for method, model in METHODS.items()}


def model_alpha0(model: str, alpha0: float) -> float:
    """The expected fraction of tokens a model generates by diffusion: eso.alpha0 for Eso-LM, 0 for AR,
    1 for MDLM and BD3-LM (every token of a block is diffused)."""
    return float(alpha0) if model == "esolm" else 0.0 if model == "ar" else 1.0
