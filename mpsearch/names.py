"""Registry names for the command line, importable without torch so that ``mpsearch --help`` answers at
once. tests/test_cli.py checks each tuple against the registry it mirrors."""

ZOO_NAMES = ("digits-cnn", "minilm-l6", "efficientnet-lite0", "smollm2-135m")  # mpsearch.models.ZOO
ESTIMATOR_NAMES = ("entropy", "fisher", "hessian", "measured", "relevance", "sqnr")  # sensitivity.REGISTRY
SOLVER_NAMES = ("bruteforce", "core", "dp", "evolutionary", "greedy", "ilp")  # solvers.REGISTRY
# The estimator with the best measured fidelity to Measured on the real models (README: Spearman 0.97 on
# smollm2-135m, 0.99 minilm-l6, 0.96 efficientnet-lite0); SQNR's plans on smollm2 were worse than uniform.
DEFAULT_ESTIMATOR = "fisher"
TARGET_NAMES = ("mpsearch", "llama.cpp", "torchao", "gptqmodel", "hqq", "json")  # mpsearch.runtimes.RUNTIMES
QUANTIZERS = ("rtn", "gptq", "imatrix")  # mpsearch.quant.quantizer.quantizer_class
