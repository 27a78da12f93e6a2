"""`esolm-eval`: generation quality of an export by the paper's protocol (arXiv 2506.01928, section 5).

evaluator  the scoring causal LM (a transformers model name or folder): its tokenizer and chunk NLLs
gen_ppl    samples -> evaluator token ids (cut at the first EOS) -> per-sample NLL -> generative perplexity
entropy    unigram entropy of a sample
sweep      the settings (method, steps T, alpha0), seeded batches split between processes, NFE and time
results    results.json / results.csv / samples.jsonl / pareto.png
tracking   the MLflow run, linked to the export's training run
cli        the command line
"""
